"""The training loop: ``train(cfg)`` sets up, then calls ``train_step()`` until ``max_steps``.

Order of one iteration: fetch ``grad_accum_steps`` micro-batches (timed: the data wait) ->
``train_step`` (feature pass, grad passes, one all-reduce of flags and losses, optimizer step or
skip) -> schedule -> validation loss (every ``eval_every`` and at the last step; its ``val/*``
values join the step's record) -> log -> evaluate (every ``eval_every``) ->
``CheckpointManager.save`` (every ``save_every``, at the last step and on a stop request) -> stop
checks. ``train`` ends with a summary on the main process (``summary``). Every rank runs the same collectives in the same order;
decisions that end or skip work (a stop signal, a non-finite loss) are all-reduced first so all
ranks agree.

What counts as a bad step (``train.max_bad_steps`` in a row stop the run): a non-finite loss on
any rank, or a non-finite global gradient norm without fp16 loss scaling. An fp16 loss-scale
overflow (the GradScaler or DeepSpeed skipping a step while it lowers the scale) is expected
early in fp16 runs: it is counted apart (``overflow_skips``), never as a bad step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from mmpretrain import distributed
from mmpretrain.config import Config, config_error, dump_config, to_dict
from mmpretrain.data.config import DataConfig
from mmpretrain.data.shardio import shards_missing
from mmpretrain.models.config import LossConfig, ModelConfig
from mmpretrain.trainer import accel, trackers
from mmpretrain.trainer.checkpoint import CheckpointManager, step_dir_name
from mmpretrain.trainer.config import TrainConfig
from mmpretrain.trainer.data import LoaderSpec, build_train_loader
from mmpretrain.trainer.faults import fault_injection
from mmpretrain.trainer.logging import RunLogger
from mmpretrain.trainer.optim import WarmupCosine, build_optimizer
from mmpretrain.word_negatives import WordNegativeError, build_table, load_word_sets

EXIT_OK = 0
EXIT_BAD_STEPS = 3


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


class SetupError(RuntimeError):
    """A bad value found while setting the run up (config, data, model, checkpoint), before the
    first step; ``mmpretrain train`` prints it as one line and exits 2."""


@contextlib.contextmanager
def setting_up():
    """Turn a ``ValueError`` raised inside into a ``SetupError``. Only set-up code runs inside:
    an error from the training loop keeps its traceback."""
    try:
        yield
    except ValueError as e:
        raise SetupError(str(e)) from e


# ----------------------------------------------------------------------------- state

@dataclass
class Counters:
    """What a resumed run needs besides model/optimizer/RNG/data: saved in ``mmpretrain.json``."""

    step: int = 0
    samples_seen: int = 0
    bad_steps_total: int = 0
    bad_steps_in_a_row: int = 0
    overflow_skips: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """From a checkpoint's ``counters`` (``read_meta`` checked the required ones); a counter
        newer than the checkpoint starts at 0."""
        for f in fields(self):
            setattr(self, f.name, int(saved.get(f.name, f.default)))


@dataclass
class StepResult:
    metrics: dict = field(default_factory=dict)
    skipped: bool = False
    """A bad step: not applied, counted towards ``train.max_bad_steps``."""
    reason: str = ""
    overflow: bool = False
    """Not applied because fp16 loss scaling overflowed (not a bad step)."""
    stop_requested: bool = False


class StopRequest:
    """SIGTERM / SIGUSR1 (preemption, SLURM's warning signal) and a first SIGINT (Ctrl-C) set a
    flag; the loop finishes the current step, all-reduces the flag so every rank agrees,
    checkpoints and exits 0. A second SIGINT stops hard (KeyboardInterrupt)."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def install(self) -> None:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt("second Ctrl-C: stopping without a checkpoint")
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@dataclass
class StepContext:
    """What ``train_step`` needs besides the model, optimizer and micro-batches."""

    accelerator: object
    deepspeed: bool
    feature_cache: bool
    """Feature pass + cache when accumulating (InfoNCE only: the triplet loss ignores it)."""
    gather: bool
    grad_clip: float
    loss_scaling: bool = False
    """fp16: an update skipped by DeepSpeed with a finite loss is a loss-scale overflow. (Without
    DeepSpeed the GradScaler itself says so.)"""
    loss_hook: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Test hook (``trainer/faults.py``, installed only when the config asks for fault
    injection): sees the last micro-batch's loss before the skip decision, may replace it."""


def uses_feature_cache(tcfg: TrainConfig, loss: LossConfig) -> bool:
    """The features pass runs only where the loss uses it: accumulation with InfoNCE."""
    return tcfg.feature_cache and tcfg.grad_accum_steps > 1 and loss.contrastive == "infonce"


# ----------------------------------------------------------------------------- one step

def model_inputs(batch: dict, device, data_cfg, dtype: torch.dtype) -> dict:
    """Loader batch (uint8 pixels, int64 ids) -> model kwargs on ``device``; pixels normalised
    there, in the weight dtype (DeepSpeed bf16 casts weights, not inputs)."""
    from mmpretrain.data.transforms import normalize

    pixels = batch["pixels"].to(device, non_blocking=True)
    return {
        "pixels": normalize(pixels, data_cfg.mean, data_cfg.std, dtype),
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "attention_mask": batch["attention_mask"].to(device, non_blocking=True),
        "image_ids": batch["image_ids"].to(device, non_blocking=True),
    }


def train_step(model, optimizer, micro_batches: list[dict], ctx: StepContext, *,
               stop_requested: bool = False) -> StepResult:
    """One optimizer step over ``len(micro_batches)`` micro-batches (model inputs, this rank's).

    With a feature cache and more than one micro-batch, a no-grad feature pass over every
    micro-batch comes first, so each grad pass contrasts against the whole accumulated batch
    (one extra forward per micro-batch). The per-step all-reduce of [non-finite?, stop?, losses]
    runs after the last forward and before the last backward: under DeepSpeed the optimizer
    step happens inside that backward, so a skip must be decided before it.
    """
    from mmpretrain.losses import FeatureCache

    accelerator = ctx.accelerator
    num_micro = len(micro_batches)
    cache = None
    if num_micro > 1 and ctx.feature_cache:
        with torch.no_grad():
            feats = [model(**inputs, mode="features") for inputs in micro_batches]
        cache = FeatureCache.from_local([f["image_emb"] for f in feats], [f["text_emb"] for f in feats],
                                        gather=ctx.gather)
        del feats
    device = micro_batches[0]["pixels"].device
    bad = torch.zeros((), dtype=torch.bool, device=device)
    sums: dict[str, torch.Tensor] = {}
    result = StepResult()
    for m, inputs in enumerate(micro_batches):
        last = m == num_micro - 1
        with accelerator.accumulate(model):
            micro_cache = cache.at(m, inputs["pixels"].shape[0]) if cache is not None else None
            out = model(**inputs, feature_cache=micro_cache)
            loss = out["loss"]
            if last and ctx.loss_hook is not None:
                loss = ctx.loss_hook(loss)
            bad = bad | ~torch.isfinite(loss.detach())
            for key, value in out.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    sums[key] = sums.get(key, 0.0) + value.detach().float().reshape(())
            if last:
                keys = sorted(sums)
                local = torch.stack([bad.float(), torch.tensor(float(stop_requested), device=device)]
                                    + [sums[k] / num_micro for k in keys])
                reduced = distributed.global_mean(local).tolist()  # one collective + one sync per step
                result.skipped = reduced[0] > 0
                result.reason = "non-finite loss" if result.skipped else ""
                result.stop_requested = reduced[1] > 0
                result.metrics = dict(zip(keys, reduced[2:]))
                if result.skipped and ctx.deepspeed:
                    # non-finite gradients everywhere -> DeepSpeed's overflow check (all-reduced)
                    # skips the step and clears the gradients on every rank
                    loss = loss * float("nan")
            accelerator.backward(loss)
            if last:
                finish_step(model, optimizer, ctx, result)
    return result


def finish_step(model, optimizer, ctx: StepContext, result: StepResult) -> None:
    """Clip + optimizer step, or the skip; DeepSpeed already stepped inside ``backward``.

    Sets ``result.skipped`` (a bad step) or ``result.overflow`` (an fp16 loss-scale skip).
    Without DeepSpeed the global gradient norm is computed even when clipping is off: after the
    DDP all-reduce every rank has the same gradients, so every rank takes the same decision
    without another collective.
    """
    accelerator = ctx.accelerator
    if ctx.deepspeed:
        applied = bool(model.was_step_applied())
        if result.skipped and applied:
            raise TrainingError("DeepSpeed applied an optimizer step whose loss was non-finite")
        if not applied and not result.skipped:
            if ctx.loss_scaling:
                result.overflow = True  # DeepSpeed lowered the loss scale
            else:  # no loss scaling: only a non-finite gradient stops DeepSpeed's update
                result.skipped, result.reason = True, "non-finite gradient norm"
        norm = model.get_global_grad_norm()
        if norm is not None and applied:
            result.metrics["grad_norm"] = float(norm)
        return
    if result.skipped:
        optimizer.zero_grad(set_to_none=True)
        return
    params = [p for p in model.parameters() if p.grad is not None]
    if ctx.grad_clip > 0:
        norm = float(accelerator.clip_grad_norm_(params, ctx.grad_clip))
    else:
        accelerator.unscale_gradients()  # fp16: the GradScaler's found-inf check happens here
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None and not math.isfinite(norm):
        # clipping multiplied the gradients by NaN, and AdamW would write them into the weights
        optimizer.zero_grad(set_to_none=True)
        result.skipped, result.reason = True, "non-finite gradient norm"
        result.metrics["grad_norm"] = norm
        return
    optimizer.step()  # with a GradScaler: skipped by the scaler on inf/NaN, which lowers the scale
    if scaler is not None and optimizer.step_was_skipped:
        result.overflow = True
    else:
        result.metrics["grad_norm"] = norm
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- set-up checks

_matches_nothing = shards_missing  # the check's old name here


def check_data(cfg: Config, need_val: bool, need_val_loss: bool = False) -> None:
    """Fail before any work when a shard pattern matches nothing (names the pattern and its
    missing files, and the settings that would train without the held-out shards), or when
    ``data.tokenizer`` names no local tokenizer, or is 'auto' with train shards that hold no
    caption to train one on (``mmpretrain.data.tokenizer.check_tokenizer``). Writes nothing; each
    message names the config file, as ``load_config``'s own errors do (``config_error``)."""
    from mmpretrain.data.tokenizer import check_tokenizer

    for spec in cfg.data.train_shards:
        why = _matches_nothing(spec)
        if why:
            raise config_error(cfg, f"data.train_shards: {why}", FileNotFoundError)
    val_missing = _matches_nothing(cfg.data.val_shards) if (need_val or need_val_loss) else None
    if val_missing:
        tcfg = cfg.train
        uses, fix = [], []
        if tcfg.eval_at_end and need_val:
            uses.append("evaluation at the end")
            fix.append("train.eval_at_end=false")
        if tcfg.eval_every > 0:
            uses.append(f"evaluation every {tcfg.eval_every} steps")
            fix.append("train.eval_every=0")
        raise config_error(cfg, f"data.val_shards: {val_missing} ({' and '.join(uses)} "
                                f"read them; set {' '.join(fix)} to train without them)", FileNotFoundError)
    try:
        check_tokenizer(cfg.data.tokenizer, list(cfg.data.train_shards))
    except ValueError as e:
        raise config_error(cfg, e) from None


def maybe_evaluation():
    """``mmpretrain.evaluation.run_evaluation`` when the evaluation package provides it."""
    try:
        from mmpretrain.evaluation.evaluate import run_evaluation
    except ImportError:
        return None
    return run_evaluation


def flops_per_sample(model_cfg: ModelConfig, loss: LossConfig, text_len: int) -> float:
    try:
        from mmpretrain.models.flops import training_flops_per_sample
    except ImportError:
        return 0.0
    try:
        return float(training_flops_per_sample(model_cfg, loss, text_len))
    except Exception:  # noqa: BLE001 - MFU is a report, never a reason to fail a run
        return 0.0


# ----------------------------------------------------------------------------- the loop

@dataclass
class Run:
    """Everything the loop touches, built once by ``setup``."""

    cfg: Config
    accelerator: object
    model: object
    optimizer: object
    scheduler: WarmupCosine
    loader: object
    tokenizer: object
    vocab_size: int
    counters: Counters
    ckpt: CheckpointManager
    logger: RunLogger
    ctx: StepContext
    input_dtype: torch.dtype
    out_dir: Path
    run_eval: object = None
    val_note_shown: bool = False


def fill_token_settings(loss: LossConfig, tokenizer, tokenizer_name: str) -> None:
    """The loss settings that come from the tokenizer, written into the loss section (and so
    recorded in the checkpoint config): the MLM mask token id (``loss.mlm_mask_token_id`` -1)
    and the word sets as token ids (``loss.word_negative_table``) when a loss term uses them."""
    if loss.mlm_weight > 0 and loss.mlm_mask_token_id < 0:
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise SetupError(f"loss.mlm_weight > 0 but the tokenizer {tokenizer_name!r} has no mask token")
        loss.mlm_mask_token_id = int(tokenizer.mask_token_id)
    wants_words = (loss.itm_word_negatives > 0 and loss.itm_weight > 0) or \
        (loss.mlm_word_prob > 0 and loss.mlm_weight > 0) or loss.itc_word_negatives > 0
    if wants_words and not loss.word_negative_table:
        try:
            table = build_table(load_word_sets(loss.word_negative_words), tokenizer)
        except WordNegativeError as e:
            raise SetupError(str(e)) from None
        if not any(row[0] != 3 for row in table):
            raise SetupError(f"loss.word_negative_words {loss.word_negative_words!r}: no word is a single token "
                             f"of the tokenizer {tokenizer_name!r}")
        loss.word_negative_table = table


def setup(cfg: Config, accelerator, info: accel.LaunchInfo, ckpt: CheckpointManager, run_eval) -> Run:
    """Tokenizer, model, optimizer (prepared), schedule, loader; ``ckpt`` restores a checkpoint.

    The one function of the loop that reads the whole tree: it records it (``config.yaml``, the
    checkpoint's description) and hands it to evaluation; every part it builds gets its section
    or a spec (tokenizer: ``data``; model: ``model`` + ``loss``; optimizer and schedule:
    ``optim``; loader: ``LoaderSpec``; logger, step context, faults: ``train``)."""
    from accelerate.utils import set_seed

    from mmpretrain.data.tokenizer import load_tokenizer
    from mmpretrain.models import build_model

    tcfg = cfg.train
    rank, world = accelerator.process_index, accelerator.num_processes
    use_ds = info.use_deepspeed
    ckpt.resume_meta(to_dict(cfg)["model"], accelerator)  # checked before anything is written
    out_dir = Path(tcfg.output_dir)
    if accelerator.is_main_process:
        ckpt.prepare_run_dir()  # train.overwrite, interrupted writes
        dump_config(cfg, out_dir / "config.yaml")
    accelerator.wait_for_everyone()  # no rank reads the run directory before it is cleared

    with accelerator.main_process_first():  # 'auto' may train the tokenizer once, on rank 0
        tokenizer = load_tokenizer(cfg.data.tokenizer, list(cfg.data.train_shards), cfg.data.vocab_size)
    vocab_size = len(tokenizer)
    fill_token_settings(cfg.loss, tokenizer, cfg.data.tokenizer)  # recorded in the checkpoint config

    set_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, cfg.loss, vocab_size)
    flops = flops_per_sample(cfg.model, cfg.loss, cfg.data.max_length)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    # its state travels in mmpretrain.json, not as an Accelerate custom object: Accelerate loads
    # those with pickle (weights_only=False), so a planted file would run code on resume
    scheduler = WarmupCosine(optimizer, cfg.optim, tcfg.max_steps)
    set_seed(cfg.seed + rank)  # per-rank randomness (dropout) from here on; a resume restores it

    loader = build_train_loader(LoaderSpec.from_config(cfg), tokenizer, rank, world)
    counters = Counters()

    def describe() -> dict:  # the run beside the states in mmpretrain.json (export and eval read it)
        return {"config": to_dict(cfg), "vocab_size": vocab_size, "distributed_type": accel.distributed_type_name(
            accelerator), "zero_stage": accel.zero_stage(accelerator), "world_size": accelerator.num_processes,
            "skipped_samples": loader.skipped}

    ckpt.attach(accelerator, data=loader, states={"counters": counters, "scheduler": scheduler},
                describe=describe, tokenizer=tokenizer)
    ckpt.restore()  # every rank: weights, optimizer, RNG, counters, schedule, data cursor

    trackers.start(accelerator, cfg, counters.step)  # accelerator.init_trackers (train.report_to)

    def tracker_log(values: dict, step: int) -> None:
        """What ``accelerator.log`` does (main process), one tracker at a time: a tracker that fails
        (its server down) costs neither the run nor the other trackers; metrics.jsonl has it all."""
        for tracker in accelerator.trackers:
            try:
                tracker.log(values, step=step)
            except Exception as e:  # noqa: BLE001 - logging never ends a run
                name = getattr(tracker, "name", type(tracker).__name__)
                failures = logger.tracker_failures
                failures[name] = failures.get(name, 0) + 1
                if failures[name] == 1:
                    logger.info(f"mmpretrain train: tracker {name} failed to log step {step} ({type(e).__name__}: "
                                f"{str(e).strip()[:200]}); metrics.jsonl keeps every value, later failures are "
                                "counted in the summary")

    logger = RunLogger(out_dir, is_main=accelerator.is_main_process, total_steps=tcfg.max_steps,
                       start_step=counters.step, log_every=tcfg.log_every, progress_bar=tcfg.progress_bar,
                       flops_per_sample=flops, peak_tflops=tcfg.peak_tflops, world_size=world,
                       tracker_log=tracker_log if tcfg.report_to else None)
    ctx = StepContext(accelerator=accelerator, deepspeed=use_ds, feature_cache=uses_feature_cache(tcfg, cfg.loss),
                      gather=cfg.loss.gather, grad_clip=cfg.optim.grad_clip,
                      loss_scaling=tcfg.mixed_precision == "fp16",
                      loss_hook=fault_injection(tcfg, counters, last_rank=rank == world - 1))
    input_dtype = next(model.parameters()).dtype if use_ds else torch.float32
    mode = accel.launch_mode(accel.distributed_type_name(accelerator), accel.zero_stage(accelerator), world)
    logger.info(f"mmpretrain train: {mode} on {accelerator.device.type}, global batch {cfg.data.global_batch_size} x "
                f"{tcfg.grad_accum_steps} accumulation, {loader.batches_per_epoch} batches/epoch/rank, steps {counters.step}->{tcfg.max_steps}"
                + (f", resumed from {ckpt.resume_from}" if ckpt.resume_from else ""))
    return Run(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
               loader=loader, tokenizer=tokenizer, vocab_size=vocab_size, counters=counters, ckpt=ckpt, logger=logger,
               ctx=ctx, input_dtype=input_dtype, out_dir=out_dir, run_eval=run_eval)


def evaluate(run: Run) -> None:
    if run.run_eval is None:
        return
    step = run.counters.step
    with torch.random.fork_rng(devices=[]):  # evaluation leaves the training RNG untouched
        results = run.run_eval(run.model, run.cfg, run.accelerator, run.tokenizer, step,
                               run.out_dir / "eval" / step_dir_name(step))
    run.logger.log_eval(step, results)


VAL_BATCH_NOTE = ("validation loss: data.val_shards holds no full batch of data.global_batch_size={} samples; "
                  "no val/loss (lower data.global_batch_size or add held-out samples)")


def is_val_part(key: str) -> bool:
    """The outputs the validation loss reports: the loss, its parts and the accuracies (not the
    step-dependent or parameter readings such as logit_scale, itm_uniform_share)."""
    return key == "loss" or key.startswith("loss_") or key.endswith("_acc")


def validation_loss(model, data_cfg: DataConfig, seed: int, accelerator, tokenizer, input_dtype: torch.dtype,
                    max_batches: int) -> tuple[dict[str, float], int]:
    """The training loss parts on ``data.val_shards``, no gradient, in eval mode: ``({"val/loss":
    ..., "val/loss_itc": ..., ...}, batches)`` over the first ``max_batches`` *full* global batches
    (``data.global_batch_size`` samples) of the held-out shards in their fixed order.

    Every rank reads those same global batches and runs its slice (rows ``rank * b ...``), so the
    model sees the batches one process would: with ``loss.gather`` the value is the same for any
    world size (the parts are global means, averaged over batches). Each rank decodes every
    sample of the global batch, O(global batch x max_batches) per evaluation, hence the small
    bound. Ranks agree on every batch before its forward (one flag all-reduce), so all run the
    same number of forwards (ZeRO-3). Neither the training RNG nor the model's sampler counters
    move (eval-mode forwards use step 0 of the seeded samplers, as evaluation does).
    """
    from mmpretrain.data.loader import ShardLoader

    rank, world = accelerator.process_index, accelerator.num_processes
    full = data_cfg.global_batch_size
    b = full // world
    device = accelerator.device
    sums: dict[str, torch.Tensor] = {}
    done = 0
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            loader = ShardLoader(data_cfg, tokenizer, rank=0, world_size=1, seed=seed, train=False)
            batches = iter(loader)
            try:
                while done < max_batches:
                    batch = next((x for x in batches if x["pixels"].shape[0] == full), None)
                    have = torch.tensor(float(batch is not None), device=device)
                    if float(distributed.global_mean(have)) < 1:  # all ranks stop at the same batch
                        break
                    local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items() if torch.is_tensor(v)}
                    out = model(**model_inputs(local, device, data_cfg, input_dtype))
                    for key, value in out.items():
                        if torch.is_tensor(value) and value.numel() == 1 and is_val_part(key):
                            sums[key] = sums.get(key, 0.0) + value.detach().float().reshape(())
                    done += 1
            finally:
                batches.close()  # the loader's workers end here
    finally:
        if was_training:
            model.train()
    if not done:
        return {}, 0
    keys = sorted(sums, key=lambda k: (k != "loss", not k.startswith("loss"), k))  # loss, its parts, accuracies
    reduced = distributed.global_mean(torch.stack([sums[k] / done for k in keys])).tolist()
    return {f"val/{k}": v for k, v in zip(keys, reduced)}, done


def validation(run: Run) -> dict[str, float]:
    values, done = validation_loss(run.model, run.cfg.data, run.cfg.seed, run.accelerator, run.tokenizer,
                                   run.input_dtype, run.cfg.train.val_batches)
    if not done and not run.val_note_shown:
        run.val_note_shown = True
        run.logger.info(VAL_BATCH_NOTE.format(run.cfg.data.global_batch_size))
    return values


def fit(run: Run, stop: StopRequest) -> None:
    """The step loop. Raises ``TrainingError`` when too many steps in a row were bad."""
    batches = run.loader.infinite()
    try:
        _steps(run, stop, batches)
    finally:
        # the DataLoader workers end here, not whenever the stream is garbage-collected: after
        # the end-of-run evaluation a reference cycle kept it alive to interpreter exit, where
        # multiprocessing joins the workers after a SIGTERM they ignore, and the rank hung
        batches.close()


def _steps(run: Run, stop: StopRequest, batches) -> None:
    cfg, tcfg, c = run.cfg, run.cfg.train, run.counters
    samples_per_step = cfg.data.global_batch_size * tcfg.grad_accum_steps
    steps_here = 0
    run.model.train()
    while c.step < tcfg.max_steps:
        t0 = time.perf_counter()
        # a DataLoader draws its workers' base seed from the global torch RNG when an epoch's
        # iterator starts (and again on resume); forking keeps the training RNG (dropout) exact
        with torch.random.fork_rng(devices=[]):
            micro = [next(batches) for _ in range(tcfg.grad_accum_steps)]
        t_data = time.perf_counter() - t0
        micro = [model_inputs(b, run.accelerator.device, cfg.data, run.input_dtype) for b in micro]
        result = train_step(run.model, run.optimizer, micro, run.ctx, stop_requested=stop.requested)
        c.step += 1
        c.samples_seen += samples_per_step
        steps_here += 1
        lr = run.scheduler.lr
        run.scheduler.step()  # the rate follows the step counter, skipped steps included
        c.bad_steps_total += int(result.skipped)
        c.overflow_skips += int(result.overflow)
        if result.skipped:
            c.bad_steps_in_a_row += 1
        elif not result.overflow:  # an overflow skip neither counts nor ends a bad stretch
            c.bad_steps_in_a_row = 0
        result.metrics.update(lr=lr, bad_steps_total=c.bad_steps_total, skipped=int(result.skipped),
                              overflow=int(result.overflow), overflow_skips=c.overflow_skips,
                              epoch=run.loader.epoch)
        if c.step % tcfg.log_every == 0 or c.step >= tcfg.max_steps:  # every rank: a collective
            # skipped samples by reason, all ranks, as they grow (metrics.jsonl and the trackers)
            for reason, n in distributed.sum_counters(run.loader.skipped).items():
                result.metrics[f"skipped_samples/{reason}"] = n
            # remote shard reads retried (all ranks, all epochs; 0 for local files): a network
            # event, not a skipped sample, so it is not part of skipped_samples
            result.metrics["remote_retries"] = distributed.sum_counters(
                {"n": run.loader.remote_retries}).get("n", 0)
        step_seconds = time.perf_counter() - t0  # the validation below is not part of the step's time
        if tcfg.eval_every and tcfg.val_batches and (c.step % tcfg.eval_every == 0 or c.step >= tcfg.max_steps):
            result.metrics.update(validation(run))
        run.logger.log_step(c.step, result.metrics, step_seconds=step_seconds, data_seconds=t_data,
                            samples=samples_per_step)
        if result.skipped:
            run.logger.info(f"step {c.step}: {result.reason}, step skipped ({c.bad_steps_in_a_row} in a row, "
                            f"{c.bad_steps_total} in all)")
        if c.bad_steps_in_a_row >= tcfg.max_bad_steps:  # before any checkpoint: the last one stays good
            raise TrainingError(
                f"{c.bad_steps_in_a_row} non-finite steps (loss or gradient norm) in a row at step {c.step} "
                f"(train.max_bad_steps={tcfg.max_bad_steps}): stopping. The last checkpoint is intact; lower "
                "optim.lr, check the data, or try train.mixed_precision=no")
        finished = c.step >= tcfg.max_steps
        if tcfg.eval_every and c.step % tcfg.eval_every == 0 and not finished:
            evaluate(run)
        stopping = result.stop_requested or (tcfg.stop_after_steps and steps_here >= tcfg.stop_after_steps)
        if path := run.ckpt.save(c.step, force=finished or stopping):
            run.logger.info(f"checkpoint: {path}")
        if stopping and not finished:
            run.logger.info(f"stop requested ({stop.signal_name or 'train.stop_after_steps'}): checkpoint written "
                            f"at step {c.step}; resume with train.resume=latest")
            return
    if tcfg.eval_at_end:
        evaluate(run)
    run.logger.info(f"done: {c.step} steps, {c.samples_seen} samples, {c.bad_steps_total} skipped steps, "
                    + (f"{c.overflow_skips} fp16 overflow skips, " if c.overflow_skips else "")
                    + f"skipped samples {run.loader.skipped or 'none'}")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary(run: Run, tracker_lines: list[str], stopped: str = "") -> str:
    """The end-of-run summary (main process): final metrics, the last checkpoint, the report, the
    trackers and the next commands (eval / export / resume), paths as the run was given them."""
    import shlex

    from mmpretrain.export.format import find_latest_checkpoint

    cfg, c, log = run.cfg, run.counters, run.logger
    out = Path(cfg.train.output_dir)
    finished = c.step >= cfg.train.max_steps
    lines = [f"summary: {c.step}/{cfg.train.max_steps} steps, {c.samples_seen} samples"
             + (f" ({stopped})" if stopped else "")]
    rec = log.last_record
    if rec:
        parts = [f"{k} {_fmt(rec[k])}" for k in ("loss", "loss_itc", "loss_itm", "itm_acc", "loss_mlm", "mlm_acc")
                 if k in rec]
        lines.append(f"  train (step {rec['step']}): " + ", ".join(parts))
    if log.last_val:
        val = dict(log.last_val)
        at = val.pop("step")
        lines.append(f"  val (step {at}): " + ", ".join(f"{k} {_fmt(v)}" for k, v in val.items()))
    report = None
    if log.last_eval:
        ev = log.last_eval
        keys = [k for k in ("mean_recall", "i2t_R@1", "t2i_R@1", "itm_mean_recall") if k in ev]
        lines.append(f"  eval (step {ev['step']}): " + ", ".join(f"{k} {float(ev[k]):.2f}" for k in keys))
        html = out / "eval" / step_dir_name(int(ev["step"])) / "report.html"
        report = html if html.is_file() else None
    ckpt = find_latest_checkpoint(out)
    lines.append(f"  checkpoint: {ckpt if ckpt else 'none written'}")
    lines.append(f"  metrics: {out / 'metrics.jsonl'}")
    lines.append(f"  report: {report}" if report else
                 "  report: none (no evaluation wrote one); the eval command below writes one")
    lines += [f"  tracker: {line}" for line in tracker_lines]
    lines += [f"  tracker {name}: {n} logging calls failed (metrics.jsonl has every value)"
              for name, n in log.tracker_failures.items()]
    q = shlex.quote
    if ckpt:
        lines.append("next:")
        lines.append(f"  eval:   mmpretrain eval --checkpoint {q(str(ckpt))}")
        lines.append(f"  export: mmpretrain export --checkpoint {q(str(ckpt))} --out {q(str(out / 'export'))}")
        resume = f"--config {q(str(out / 'config.yaml'))} train.resume=latest"
        if cfg.train.overwrite:
            resume += " train.overwrite=false"
        if finished:
            resume += f" train.max_steps={2 * cfg.train.max_steps}"
            what = "train on (the schedule then runs to the new train.max_steps)"
        else:
            what = "resume"
        if run.accelerator.num_processes > 1:
            lines.append(f"  {what}: the same launch command with -m mmpretrain.train {resume}")
        else:
            lines.append(f"  {what}: mmpretrain train {resume}")
    return "\n".join(lines)


def train(cfg: Config) -> int:
    """Train from ``cfg``; returns the process exit code (0 also after a stop request).

    Set-up raises ``SetupError`` for a bad value (config, data, model) and ``CheckpointError`` /
    ``LaunchError`` / ``FileNotFoundError`` before the first step; errors from inside the
    training loop propagate unchanged.
    """
    tcfg = cfg.train
    run_eval = maybe_evaluation()
    with setting_up():  # start-up validation, before any process group or model exists
        trackers.check_installed(tcfg.report_to)
        try:
            cfg.model.check_image_grid()  # model.patch_size tiles model.image_size
        except ValueError as e:
            raise config_error(cfg, e) from None
        if uses_feature_cache(tcfg, cfg.loss) and cfg.loss.itc_word_negatives > 0:
            raise config_error(cfg, "loss.itc_word_negatives does not combine with the feature cache; set "
                                    "train.feature_cache=false or loss.itc_word_negatives=0")
        if uses_feature_cache(tcfg, cfg.loss) and cfg.loss.itc_token_weight > 0:
            raise config_error(cfg, "loss.itc_token_weight does not combine with the feature cache; set "
                                    "train.feature_cache=false or loss.itc_token_weight=0")
        if uses_feature_cache(tcfg, cfg.loss) and cfg.model.dropout > 0:
            raise config_error(cfg, "train.feature_cache needs model.dropout=0 (the cached and the recomputed "
                                    "embeddings must agree); set model.dropout=0 or train.feature_cache=false")
        # the files after the values: the shards, and the tokenizer ('auto' reads the shards)
        check_data(cfg, need_val=run_eval is not None and (tcfg.eval_at_end or tcfg.eval_every > 0),
                   need_val_loss=tcfg.eval_every > 0 and tcfg.val_batches > 0)
        ckpt = CheckpointManager.from_config(tcfg)
        ckpt.check_start()  # the run-directory rule and the checkpoint to resume from
        runtime = accel.start_runtime(accel.AcceleratorSpec.from_config(cfg), tcfg)  # launch checks
    accelerator, info = runtime.accelerator, runtime.info
    ckpt.announce_start(runtime.is_main)
    stop = StopRequest()
    exit_code = EXIT_OK
    run = None
    end_note = None
    # the one teardown (mmpretrain.runtime): after a clean exit every rank waits for the others,
    # then the process group ends and Accelerate's state is reset, so train() can run again
    with runtime:
        try:
            if info.use_deepspeed and accel.zero_stage(accelerator) == 0:
                raise accel.LaunchError("DeepSpeed ZeRO stage 0 cannot skip non-finite steps; use DDP or stage 1-3")
            with setting_up():
                run = setup(cfg, accelerator, info, ckpt, run_eval)
            stop.install()
            fit(run, stop)
            if run.counters.step < tcfg.max_steps:
                end_note = "stopped: " + (stop.signal_name or "train.stop_after_steps")
            else:
                end_note = ""
        except TrainingError as e:  # every rank raises it together (the decision was all-reduced)
            if runtime.is_main:
                print(f"mmpretrain train: {e}", file=sys.stderr, flush=True)
            exit_code = EXIT_BAD_STEPS
            end_note = "stopped: too many bad steps"
        finally:
            stop.uninstall()
            if run is not None:
                run.logger.close()
        text = None
        if end_note is not None and runtime.is_main:
            text = summary(run, trackers.where(accelerator), end_note)
    # printed after the runtime's end_training(): the trackers' own closing lines come before it
    if text:
        print(text, flush=True)
    return exit_code
