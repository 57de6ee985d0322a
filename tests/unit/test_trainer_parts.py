"""Trainer parts without a training run: optimizer groups and schedule, the fp16-overflow
step bookkeeping, launch checks, DeepSpeed config filling, start-up validation and start-up
errors in one line (each fails before the first step). The training runs themselves are in
tests/e2e/test_trainer_runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _trainutil import REPO, make_config, run_train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_config(tmp_path_factory.getbasetemp())


def test_optimizer_groups_and_schedule():
    from mmpretrain.config import load_config
    from mmpretrain.models import build_model
    from mmpretrain.trainer.optim import WarmupCosine, build_optimizer, lr_at

    cfg = load_config(None, ["model.width=32", "model.depth=1", "model.num_heads=2", "model.embed_dim=16",
                             "model.image_size=32", "optim.warmup_steps=4", "optim.lr=1.0", "optim.min_lr_ratio=0.1"])
    model = build_model(cfg.model, cfg.loss, vocab_size=50)
    opt = build_optimizer(model, cfg.optim)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == cfg.optim.weight_decay and groups["no_decay"]["weight_decay"] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert any("logit_scale" in n for n in no_decay)
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decay)
    embeddings = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)}
    norms = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert embeddings and norms and (embeddings | norms) <= no_decay
    assert not decay & no_decay and len(decay) + len(no_decay) == len(list(model.parameters()))

    assert [lr_at(s, cfg.optim, 20) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # 0-based step 19 is the last of 20; the cosine runs from the peak (step 3) to it, midpoint 11
    assert lr_at(19, cfg.optim, 20) == pytest.approx(0.1) and lr_at(11, cfg.optim, 20) == pytest.approx(0.55)
    sched = WarmupCosine(opt, cfg.optim, 20)
    sched.load_state_dict({"steps_taken": 11})
    assert all(g["lr"] == pytest.approx(0.55) for g in opt.param_groups)


@pytest.mark.parametrize("head", ["pooler", "match"])
def test_itm_head_lr_mult_puts_the_head_in_its_own_groups(head):
    from mmpretrain.config import load_config
    from mmpretrain.models import build_model
    from mmpretrain.trainer.optim import WarmupCosine, build_optimizer

    over = ["model.width=32", "model.depth=1", "model.num_heads=2", "model.embed_dim=16", "model.image_size=32",
            "model.fusion_source=towers", f"model.itm_head={head}", "optim.lr=1.0", "optim.warmup_steps=0"]
    cfg = load_config(None, over + ["optim.itm_head_lr_mult=50"])
    model = build_model(cfg.model, cfg.loss, vocab_size=50)
    opt = build_optimizer(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    head_names = {n for n, _ in model.named_parameters() if n.startswith(("backbone.itm_head.", "backbone.itm_match."))}
    assert head_names and groups["itm_head_no_decay"] | groups.get("itm_head_decay", set()) == head_names
    assert not head_names & (groups["decay"] | groups["no_decay"])
    WarmupCosine(opt, cfg.optim, 10)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["decay"] == pytest.approx(1.0) and lrs["itm_head_no_decay"] == pytest.approx(50.0)
    # the default keeps the two groups of earlier versions (checkpoints resume)
    cfg1 = load_config(None, over)
    assert [g["name"] for g in build_optimizer(build_model(cfg1.model, cfg1.loss, 50), cfg1.optim).param_groups] \
        == ["decay", "no_decay"]
    with pytest.raises(ValueError, match="itm_head_lr_mult"):
        load_config(None, over + ["optim.itm_head_lr_mult=0"])


@pytest.mark.parametrize("warmup, total", [(4, 20), (0, 20), (0, 2), (3, 4)])
def test_schedule_as_the_loop_steps_it(warmup, total):
    """The rate each optimizer step uses, stepped as ``fit`` does (read, optimizer step,
    ``scheduler.step()``): first step, warmup end, last step exactly lr * min_lr_ratio."""
    from mmpretrain.trainer.config import OptimConfig
    from mmpretrain.trainer.optim import WarmupCosine

    cfg = OptimConfig(lr=1.0, warmup_steps=warmup, min_lr_ratio=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = WarmupCosine(opt, cfg, total)
    used = []
    for _ in range(total):  # steps 1..total
        used.append(opt.param_groups[0]["lr"])
        assert sched.lr == used[-1]  # what metrics.jsonl records
        sched.step()
    assert used[0] == pytest.approx(1.0 / warmup if warmup else 1.0)
    peak = max(warmup, 1)  # 1-based step at the peak
    assert used[peak - 1] == pytest.approx(1.0) and used.count(1.0) == 1
    assert used[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(used[peak - 1:], used[peak:]))


class _Optimizer:
    def __init__(self, step_was_skipped=False):
        self.step_was_skipped, self.steps, self.zeroed = step_was_skipped, 0, 0

    def step(self):
        self.steps += 1

    def zero_grad(self, set_to_none=True):
        self.zeroed += 1


def _ctx(deepspeed: bool, loss_scaling: bool, accelerator=None):
    from mmpretrain.trainer.loop import StepContext

    return StepContext(accelerator=accelerator, deepspeed=deepspeed, feature_cache=False, gather=False,
                       grad_clip=1.0, loss_scaling=loss_scaling)


def test_fp16_overflow_skip_is_not_a_bad_step():
    """A step skipped by loss scaling (finite loss) is an overflow, not a bad step; without loss
    scaling an update DeepSpeed refused with a finite loss is a non-finite gradient."""
    from types import SimpleNamespace

    from mmpretrain.trainer.loop import StepResult, finish_step

    engine = SimpleNamespace(was_step_applied=lambda: False, get_global_grad_norm=lambda: None)
    r = StepResult()
    finish_step(engine, None, _ctx(deepspeed=True, loss_scaling=True), r)
    assert r.overflow and not r.skipped
    r = StepResult()
    finish_step(engine, None, _ctx(deepspeed=True, loss_scaling=False), r)
    assert r.skipped and not r.overflow and r.reason == "non-finite gradient norm"
    r = StepResult(skipped=True, reason="non-finite loss")  # a non-finite loss stays a bad step
    finish_step(engine, None, _ctx(deepspeed=True, loss_scaling=True), r)
    assert r.skipped and not r.overflow

    # without DeepSpeed: the GradScaler skipped the step (inf gradients after unscaling)
    model = torch.nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    acc = SimpleNamespace(scaler=object(), unscale_gradients=lambda: None,
                          clip_grad_norm_=lambda params, max_norm: torch.tensor(float("inf")))
    opt = _Optimizer(step_was_skipped=True)
    r = StepResult()
    finish_step(model, opt, _ctx(deepspeed=False, loss_scaling=True, accelerator=acc), r)
    assert opt.steps == 1  # the scaler must see the step to lower its scale
    assert r.overflow and not r.skipped and "grad_norm" not in r.metrics


def test_start_up_value_errors_are_one_line_and_loop_errors_are_not_swallowed(tiny, tmp_path, capsys,
                                                                               monkeypatch):
    # the loader refuses a batch larger than the data (a ValueError raised during set-up)
    assert run_train(tiny, tmp_path / "big", "data.global_batch_size=512") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("mmpretrain train")]
    assert len(lines) == 1 and lines[0].startswith("mmpretrain train: ") and "data.global_batch_size=512" in lines[0]

    from mmpretrain.trainer import loop

    def broken(*args, **kwargs):
        raise ValueError("a bug inside the training loop")

    monkeypatch.setattr(loop, "train_step", broken)
    with pytest.raises(ValueError, match="a bug inside the training loop"):
        run_train(tiny, tmp_path / "loop")


def test_one_helper_for_accelerate_reset_and_step_dir_names():
    """Accelerate's state is reset through ``runtime.reset_accelerate_state`` only (trainer and
    evaluation alike), and step directories are named through ``checkpoint.step_dir_name`` only."""
    import inspect

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from mmpretrain import runtime
    from mmpretrain.evaluation import cli as eval_cli
    from mmpretrain.trainer import accel, checkpoint, loop

    Accelerator(cpu=True)
    assert PartialState._shared_state and AcceleratorState._shared_state
    runtime.reset_accelerate_state()
    assert not PartialState._shared_state and not AcceleratorState._shared_state
    for module in (loop, accel, eval_cli, runtime):
        source = inspect.getsource(module)
        assert source.count("_reset_state(") == (2 if module is runtime else 0), module.__name__
        assert ":08d}" not in source, module.__name__
    assert ":08d}" in inspect.getsource(checkpoint.step_dir_name)


@pytest.mark.parametrize("override, message", [
    ("data.batch_sise=8", "unknown config key 'data.batch_sise'; did you mean 'data.global_batch_size'"),
    ("data.train_shards=[/nonexistent/train-*.tar]", "no shards match '/nonexistent/train-*.tar'"),
    ("train.resume=/nonexistent/step_00000003", "no such checkpoint directory"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
])
def test_bad_config_fails_before_any_work(tiny, tmp_path, capsys, override, message):
    run = tmp_path / "run"
    assert run_train(tiny, run, override) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_report_to_names_and_tracker_start_up_errors_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    """train.report_to: lists, comma lists, 'none' and [] parse; unknown names and a tracker whose
    package is missing stop the run before any work with one line naming train.report_to and the
    pip command; a tracker that fails to start is one line too; the held-out shards are required
    as soon as eval_every is set, with a hint that works."""
    from mmpretrain.config import ConfigError, load_config
    from mmpretrain.trainer import trackers

    parse = lambda *o: load_config(None, list(o)).train.report_to  # noqa: E731
    assert parse() == ["tensorboard"]
    assert parse("train.report_to=none") == parse("train.report_to=[]") == parse("train.report_to=") == []
    assert parse("train.report_to=wandb,mlflow") == parse("train.report_to=[wandb, mlflow, wandb]") == ["wandb",
                                                                                                       "mlflow"]
    assert parse("train.report_to=[tensorboard,wandb]", "train.tensorboard=false") == ["wandb"]
    for bad, message in (("comet", "unknown tracker 'comet'"), ("[none,wandb]", "'none' cannot be combined")):
        with pytest.raises(ConfigError, match=message):
            parse(f"train.report_to={bad}")
    assert trackers.mlflow_key("eval/i2t_R@1") == "eval/i2t_R_at_1"

    monkeypatch.setitem(trackers.PACKAGES, "wandb", ("mmpretrain_no_such_package", "wandb"))
    run = tmp_path / "run"
    assert run_train(tiny, run, "train.report_to=[tensorboard,wandb]") == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mmpretrain train: train.report_to includes 'wandb'") and "pip install wandb" in lines[0]
    assert not run.exists()

    # a tracker that fails to start (an MLflow file store that is a file): one line, nothing half-started
    (tmp_path / "not_a_dir").write_text("x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'not_a_dir'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the trainer would set, undone after the test
    assert run_train(tiny, tmp_path / "mlflow_run", "train.report_to=mlflow") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "train.report_to=['mlflow']: a tracker failed to start (" in err, err

    assert run_train(tiny, run, "data.val_shards=/nonexistent/val-*.tar", "train.eval_every=2",
                     "train.eval_at_end=false") == 2
    err = capsys.readouterr().err
    assert "no shards match '/nonexistent/val-*.tar'" in err and "set train.eval_every=0 to train without" in err


def test_start_up_line_names_the_launch_in_words(tiny, tmp_path, capsys):
    from mmpretrain.trainer.accel import launch_mode

    assert launch_mode("NO", 0, 1) == "single process"
    assert launch_mode("MULTI_CPU", 0, 2) == "DDP, 2 processes"
    assert launch_mode("MULTI_GPU", 0, 8) == "DDP, 8 processes"
    assert launch_mode("DEEPSPEED", 2, 2) == "DeepSpeed ZeRO-2, 2 processes"
    assert launch_mode("DEEPSPEED", 3, 1) == "DeepSpeed ZeRO-3, 1 process"
    assert run_train(tiny, tmp_path / "run", "train.max_steps=1", "train.eval_at_end=false") == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "global batch" in ln)
    assert line.startswith("mmpretrain train: single process on cpu, global batch "), line
    assert "NO" not in line.split(",")[0]


def test_launch_checks():
    from types import SimpleNamespace

    from mmpretrain import runtime
    from mmpretrain.config import load_config
    from mmpretrain.trainer import accel

    with pytest.raises(accel.LaunchError, match=r"data.global_batch_size=6 .* not divisible by the world size 4"):
        accel.per_rank_batch_size(6, 4)
    # Accelerate seeing 1 process where the launcher started 2 (e.g. `accelerate launch --cpu`)
    info = runtime.LaunchInfo(launched=True, world_size=2, use_deepspeed=False, has_gpu=False)
    one = SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(name="NO"))
    with pytest.raises(runtime.LaunchError, match="Accelerate sees 1 process"):
        runtime.check_accelerator(one, info)
    # DeepSpeed asked for, DDP running (ACCELERATE_USE_CPU with a DeepSpeed plugin)
    info_ds = runtime.LaunchInfo(launched=False, world_size=1, use_deepspeed=True, has_gpu=False)
    ddp = SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(name="NO"))
    with pytest.raises(runtime.LaunchError, match="DEEPSPEED was launched"):
        runtime.check_accelerator(ddp, info_ds)

    cfg = load_config(None, ["data.global_batch_size=16", "train.grad_accum_steps=2", "optim.grad_clip=0.5",
                             "train.mixed_precision=bf16", "model.width=64"])
    spec = accel.AcceleratorSpec.from_config(cfg)  # what the launch reads of the tree
    assert spec == accel.AcceleratorSpec(global_batch_size=16, grad_accum_steps=2, grad_clip=0.5,
                                         mixed_precision="bf16", width=64, compile=False, unused_parameters=False)
    unused = accel.AcceleratorSpec.from_config(load_config(None, ["loss.itm_weight=0"]))
    assert unused.unused_parameters and accel.may_leave_parameters_unused(load_config(None, [
        "loss.contrastive=triplet"]).loss)
    ds = json.loads((REPO / "launch/zero3.json").read_text())
    filled = accel.fill_deepspeed_config(ds, spec, world_size=4)
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["train_batch_size"] == 32
    assert filled["gradient_accumulation_steps"] == 2 and filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["zero_optimization"]["stage"] == 3 and filled["zero_optimization"]["reduce_bucket_size"] == 4096
    ds["gradient_accumulation_steps"] = 4
    with pytest.raises(accel.LaunchError, match=r"gradient_accumulation_steps=4 .* train.grad_accum_steps gives 2"):
        accel.fill_deepspeed_config(ds, spec, world_size=4)


def test_deepspeed_with_accelerate_use_cpu_is_refused(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_train(tiny, tmp_path / "run") == 2
    assert "ACCELERATE_USE_CPU" in capsys.readouterr().err


def test_metrics_truncation_on_resume_is_atomic(tmp_path, monkeypatch):
    import json
    import os

    from mmpretrain.trainer import logging as tl

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')  # a kill cut the last line
    before = path.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt("killed during the rewrite")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        tl.truncate_metrics(path, 3)
    assert path.read_bytes() == before  # nothing lost
    monkeypatch.undo()
    tl.truncate_metrics(path, 3)
    assert path.read_text() == "\n".join(lines[:3]) + "\n"
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_checkpoint_manager_interval_retention_and_restore(tmp_path):
    """The manager saves when due (or forced), keeps the newest keep_last, and restores every
    attached part: the Accelerate state, the data cursor and the named states."""
    from accelerate import Accelerator

    from mmpretrain import runtime
    from mmpretrain.trainer.checkpoint import CheckpointManager
    from mmpretrain.trainer.config import OptimConfig
    from mmpretrain.trainer.loop import Counters
    from mmpretrain.trainer.optim import WarmupCosine

    class Cursor:
        def __init__(self):
            self.batches = 0

        def state_dict(self):
            return {"batches": self.batches}

        def load_state_dict(self, state):
            self.batches = state["batches"]

    def parts(seed):
        torch.manual_seed(seed)
        acc = Accelerator(cpu=True)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = acc.prepare(model, opt)
        return acc, model, opt, Counters(), WarmupCosine(opt, OptimConfig(lr=1e-2, warmup_steps=2), 10), Cursor()

    try:
        acc, model, opt, counters, sched, cursor = parts(0)
        ckpt = CheckpointManager(tmp_path, save_every=2, keep_last=2)
        assert ckpt.check_start() is None
        ckpt.attach(acc, data=cursor, states={"counters": counters, "scheduler": sched},
                    describe=lambda: {"config": {}, "vocab_size": 1, "distributed_type": "NO", "world_size": 1})
        saved = []
        for step in range(1, 6):
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
            counters.step, cursor.batches = step, 10 * step
            sched.step()
            saved.append(ckpt.save(step, force=step == 5))
        assert [p.name if p else None for p in saved] == [None, "step_00000002", None, "step_00000004",
                                                          "step_00000005"]
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        runtime.reset_accelerate_state()

        acc, model, opt, counters, sched, cursor = parts(1)
        again = CheckpointManager(tmp_path, save_every=2, keep_last=2, resume="latest")
        assert again.check_start() == tmp_path / "checkpoints/step_00000005"
        again.attach(acc, data=cursor, states={"counters": counters, "scheduler": sched}, describe=dict)
        meta = again.restore()
        assert meta["step"] == 5 and counters.step == 5 and sched.steps_taken == 5 and cursor.batches == 50
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    finally:
        runtime.reset_accelerate_state()


def test_fault_injection_is_a_hook_outside_the_step_signature():
    """inject_nan* reach the step as StepContext.loss_hook, only on the last rank and only when
    asked; the step's signature has no fault parameters."""
    import inspect

    from mmpretrain.config import load_config
    from mmpretrain.trainer import loop
    from mmpretrain.trainer.faults import fault_injection

    assert list(inspect.signature(loop.train_step).parameters) == ["model", "optimizer", "micro_batches", "ctx",
                                                                   "stop_requested"]
    tcfg = load_config(None, ["train.inject_nan_steps=[2]", "train.inject_nan_grad_steps=[3]"]).train
    counters = loop.Counters()
    assert fault_injection(load_config(None, []).train, counters, last_rank=True) is None
    assert fault_injection(tcfg, counters, last_rank=False) is None
    hook = fault_injection(tcfg, counters, last_rank=True)
    x = torch.tensor(2.0, requires_grad=True)
    assert hook(x * 1.0).item() == 2.0  # step 1: untouched
    counters.step = 1
    assert torch.isnan(hook(x * 1.0))  # step 2: a NaN loss
    counters.step = 2
    loss = hook(x * 1.0)  # step 3: a finite loss with a NaN gradient
    loss.backward()
    assert loss.item() == 2.0 and torch.isnan(x.grad)


def test_bench_timers_wrap_the_model_from_outside():
    """The model has no timers (no cuda.synchronize in it); the bench's RegionTimers wraps
    gather_embeddings and mine_itm_negatives of one instance and restores them."""
    import inspect

    from mmpretrain.config import load_config
    from mmpretrain.models import PretrainModel, build_model
    from mmpretrain.models.bench import RegionTimers

    assert "synchronize" not in inspect.getsource(PretrainModel) and not hasattr(PretrainModel, "timers")
    cfg = load_config(None, ["model.width=32", "model.depth=1", "model.num_heads=2", "model.embed_dim=16",
                             "model.image_size=32", "model.patch_size=8", "model.max_text_length=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, vocab_size=50).train()
    batch = (torch.randn(4, 3, 32, 32), torch.randint(1, 50, (4, 8)), torch.ones(4, 8, dtype=torch.long))
    timers = RegionTimers()
    timers.install(model)
    model(*batch)["loss"].backward()
    assert set(timers.seconds) == {"gather", "itm_mining"} and all(v >= 0 for v in timers.seconds.values())
    timers.remove(model)
    assert "gather_embeddings" not in model.__dict__ and "mine_itm_negatives" not in model.__dict__
    before = dict(timers.seconds)
    model(*batch)  # no longer timed
    assert timers.seconds == before


def test_the_train_loader_reads_a_spec_of_the_tree(tiny):
    """``build_train_loader`` takes a ``LoaderSpec`` (data section, seed, emulated world size);
    ``TrainData`` given a whole tree reads the same spec of it, batch for batch."""
    from mmpretrain.config import load_config
    from mmpretrain.data.tokenizer import load_tokenizer
    from mmpretrain.trainer.data import LoaderSpec, TrainData, build_train_loader

    cfg = load_config(tiny, ["data.num_workers=0", "seed=3", "train.emulate_world_size=2"])
    spec = LoaderSpec.from_config(cfg)
    assert spec == LoaderSpec(data=cfg.data, seed=3, emulate_world_size=2)
    tok = load_tokenizer(cfg.data.tokenizer, list(cfg.data.train_shards), cfg.data.vocab_size)
    streams = [build_train_loader(spec, tok, 0, 1).infinite(), TrainData(cfg, tok, 0, 1).infinite()]
    try:
        a, b = (next(s) for s in streams)
    finally:
        for s in streams:
            s.close()
    assert a["keys"] == b["keys"] and len(a["keys"]) == cfg.data.global_batch_size
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_token_settings_are_filled_into_the_loss_section(tiny):
    from types import SimpleNamespace

    from mmpretrain.config import load_config
    from mmpretrain.data.tokenizer import load_tokenizer
    from mmpretrain.models.config import LossConfig
    from mmpretrain.trainer.loop import SetupError, fill_token_settings

    cfg = load_config(tiny)
    tok = load_tokenizer(cfg.data.tokenizer, list(cfg.data.train_shards), cfg.data.vocab_size)
    loss = LossConfig(mlm_weight=1.0, itm_word_negatives=0.5)
    fill_token_settings(loss, tok, "auto")
    assert loss.mlm_mask_token_id == tok.mask_token_id >= 0
    assert loss.word_negative_table and any(row[0] != 3 for row in loss.word_negative_table)
    untouched = LossConfig()
    fill_token_settings(untouched, tok, "auto")
    assert untouched == LossConfig()  # no term asks: nothing filled
    with pytest.raises(SetupError, match="the tokenizer 'plain' has no mask token"):
        fill_token_settings(LossConfig(mlm_weight=1.0), SimpleNamespace(mask_token_id=None), "plain")
