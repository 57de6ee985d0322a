"""Trainer, single process on CPU: a debug config trains and its loss goes down; the run
directory and checkpoint layout; optimizer groups and schedule; gradient accumulation with the
feature cache (InfoNCE only); non-finite losses and gradients; fp16 overflow skips; start-up
validation and start-up errors.

Helpers here (tiny shards, run config, metrics readers) are shared with test_resume.py and
test_trainer_distributed.py.
"""

from __future__ import annotations

import json
import time
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _proc

from mmpretrain.train import main

REPO = Path(__file__).resolve().parents[1]

TINY = """\
seed: 0
data:
  train_shards: ["{shards}/train-*.tar"]
  val_shards: "{shards}/val-*.tar"
  tokenizer: {shards}/tokenizer
  max_length: 16
  image_size: 32
  batch_size: 8
  num_workers: 0
  shuffle_buffer: 32
  train_crop: center
model:
  image_size: 32
  patch_size: 8
  width: 32
  depth: 2
  num_heads: 2
  embed_dim: 32
  max_text_length: 16
optim:
  lr: 2.0e-3
  warmup_steps: 2
  min_lr_ratio: 0.1
train:
  max_steps: 6
  log_every: 2
  save_every: 3
  keep_last: 2
  eval_at_end: false
  progress_bar: false
"""


# ----------------------------------------------------------------------------- shared helpers

def make_shards(base: Path) -> Path:
    """256 train + 2x16 val synthetic samples of 32 px in ``base/trainer_shards`` (made once)."""
    from mmpretrain.data.synthetic import generate

    out = base / "trainer_shards"
    if not (out / "manifest.json").is_file():
        generate(str(out), num_samples=256, num_val=16, samples_per_shard=64, image_size=32, vocab_size=300)
    return out


def make_config(base: Path) -> Path:
    path = base / "trainer_tiny.yaml"
    if not path.is_file():
        path.write_text(TINY.format(shards=make_shards(base)))
    return path


def run_train(config: Path, out_dir: Path, *overrides: str) -> int:
    return main(["--config", str(config), f"train.output_dir={out_dir}", *overrides])


def metrics(run_dir: Path) -> dict[int, dict]:
    """Last training record per step of ``metrics.jsonl`` (eval records left out)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval" not in rec:
            out[rec["step"]] = rec
    return out


def wait_for_metric_lines(proc, run_dir: Path, lines: int, seconds: float) -> None:
    """Block until the running trainer ``proc`` has written ``lines`` rows of metrics.jsonl."""
    deadline = time.time() + seconds
    mfile = Path(run_dir) / "metrics.jsonl"
    while time.time() < deadline:
        if mfile.is_file() and len(mfile.read_text().splitlines()) >= lines:
            return
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        time.sleep(0.1)
    raise AssertionError(f"no {lines} metrics rows in {seconds}s")


def losses(run_dir: Path) -> list[float]:
    recs = metrics(run_dir)
    return [recs[s]["loss"] for s in sorted(recs)]


def assert_losses_close(a: list[float], b: list[float], tol: float) -> None:
    assert len(a) == len(b), (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        if math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y), f"step {i + 1}: {x} vs {y}"
        else:
            assert abs(x - y) <= tol, f"step {i + 1}: {x} vs {y} (all: {a} vs {b})"


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k] - b[k]).abs().max()}"


def run_subprocess(args: list[str], env_extra: dict | None = None, timeout: float = 300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    env.pop("ACCELERATE_USE_CPU", None)
    return _proc.run(args, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_config(tmp_path_factory.getbasetemp())


# ----------------------------------------------------------------------------- tests

def test_debug_config_trains_and_writes_the_run_layout(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    rc = run_train(tiny, run, "train.max_steps=30", "train.log_every=10", "train.save_every=10",
                   "optim.lr=5e-4", "optim.warmup_steps=3", "loss.itm_weight=0.5", "train.peak_tflops=0.5",
                   "train.eval_at_end=true", "eval.itm_rerank_k=4", "eval.report=false")
    assert rc == 0
    out = capsys.readouterr().out
    recs = metrics(run)
    assert sorted(recs) == list(range(1, 31))
    curve = [recs[s]["loss"] for s in range(1, 31)]
    assert all(math.isfinite(x) for x in curve)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.1, f"loss did not go down: {first:.4f} -> {last:.4f}"
    for key in ("loss_itc", "loss_itm", "lr", "samples_per_s", "data_wait", "mem_gb", "grad_norm", "mfu",
                "overflow", "overflow_skips"):
        assert key in recs[30], key
    assert recs[30]["mfu"] > 0 and 0 <= recs[30]["data_wait"] <= 1
    # evaluation at the end, through mmpretrain.evaluation's run_evaluation
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert [e["step"] for e in evals] == [30] and "i2t_R@1" in evals[0]["eval"]
    assert json.loads((run / "eval/step_00000030/metrics.json").read_text())["step"] == 30
    # warmup then cosine: the peak once (the last warmup step), the last step exactly at min_lr_ratio * lr
    assert recs[1]["lr"] == pytest.approx(5e-4 / 3)
    assert recs[3]["lr"] == pytest.approx(5e-4)
    assert recs[3]["lr"] > recs[4]["lr"] > recs[15]["lr"] > recs[29]["lr"] > recs[30]["lr"]
    assert recs[30]["lr"] == pytest.approx(5e-5)
    # the dense line
    line = next(ln for ln in out.splitlines() if ln.startswith("step 30/30"))
    for part in ("loss", "itc", "itm", "lr", "samples/s", "data", "mem", "mfu", "eta"):
        assert part in line, (part, line)
    assert "mfu n/a" not in line and "eval @ step 30: " in out

    # run directory: resolved config, metrics, tensorboard, last K checkpoints
    assert (run / "config.yaml").is_file()
    from mmpretrain.config import load_config

    assert load_config(run / "config.yaml").train.max_steps == 30
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000020", "step_00000030"]  # keep_last=2, nothing half-written left
    ckpt = run / "checkpoints" / "step_00000030"
    meta = json.loads((ckpt / "mmpretrain.json").read_text())
    assert meta["format"] == "mmpretrain-ckpt/1" and meta["step"] == 30
    assert meta["distributed_type"] == "NO" and meta["zero_stage"] == 0 and meta["world_size"] == 1
    assert meta["config"]["train"]["max_steps"] == 30 and meta["vocab_size"] > 10
    assert meta["data_state"]["batches"] == 30 and meta["counters"]["step"] == 30
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "data_state_0.json",
                 "tokenizer/tokenizer.json"):
        assert (ckpt / name).is_file(), name
    # mmpretrain.json is written last: no file in the directory is newer
    newest = max(p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file())
    assert (ckpt / "mmpretrain.json").stat().st_mtime_ns == newest


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


def test_grad_accumulation_with_feature_cache_equals_the_big_batch(tiny, tmp_path):
    """2 micro-batches of 4 with the feature cache = one batch of 8 (InfoNCE only: ITM mines
    negatives per micro-batch by design)."""
    common = ["loss.itm_weight=0", "train.save_every=100"]
    assert run_train(tiny, tmp_path / "big", *common) == 0
    assert run_train(tiny, tmp_path / "acc", *common, "data.batch_size=4", "train.grad_accum_steps=2") == 0
    assert run_train(tiny, tmp_path / "nocache", *common, "data.batch_size=4", "train.grad_accum_steps=2",
                     "train.feature_cache=false") == 0
    big, acc, nocache = losses(tmp_path / "big"), losses(tmp_path / "acc"), losses(tmp_path / "nocache")
    assert_losses_close(big, acc, 1e-5)
    w_big = checkpoint_weights(tmp_path / "big/checkpoints/step_00000006")
    w_acc = checkpoint_weights(tmp_path / "acc/checkpoints/step_00000006")
    for k in w_big:
        assert torch.allclose(w_big[k], w_acc[k], atol=1e-5), k
    # without the cache each micro-batch contrasts only against itself: a different objective
    assert abs(nocache[0] - big[0]) > 1e-3


def test_non_finite_steps_are_skipped_and_counted(tiny, tmp_path):
    run = tmp_path / "run"
    rc = run_train(tiny, run, "train.inject_nan_steps=[2,3]", "train.save_every=1", "train.keep_last=10",
                   "train.max_bad_steps=3")
    assert rc == 0
    recs = metrics(run)
    assert [recs[s]["skipped"] for s in range(1, 7)] == [0, 1, 1, 0, 0, 0]
    assert recs[6]["bad_steps_total"] == 2
    ckpts = run / "checkpoints"
    w1, w3, w4 = (checkpoint_weights(ckpts / f"step_{s:08d}") for s in (1, 3, 4))
    floats = lambda w: {k: v for k, v in w.items() if v.is_floating_point()}  # noqa: E731 (not the ITM step counter)
    assert_same_weights(floats(w1), floats(w3))  # skipped steps leave the weights alone
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)
    assert json.loads((ckpts / "step_00000006/mmpretrain.json").read_text())["counters"]["bad_steps_total"] == 2


def test_too_many_bad_steps_stop_with_the_last_checkpoint_intact(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    rc = run_train(tiny, run, "train.inject_nan_steps=[3,4,5]", "train.save_every=2", "train.max_bad_steps=2")
    assert rc != 0
    err = capsys.readouterr().err
    assert "non-finite" in err and "train.max_bad_steps=2" in err
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000002"]
    meta = json.loads((run / "checkpoints/step_00000002/mmpretrain.json").read_text())
    assert meta["counters"]["bad_steps_total"] == 0


@pytest.mark.parametrize("grad_clip", ["1.0", "0"])
def test_non_finite_gradient_with_a_finite_loss_is_skipped(tiny, tmp_path, capsys, grad_clip):
    """A NaN gradient (finite loss) at step 2: not applied (clipping would multiply the gradients
    by NaN, AdamW would write them into the weights), counted as a bad step."""
    run = tmp_path / "run"
    rc = run_train(tiny, run, "train.inject_nan_grad_steps=[2]", f"optim.grad_clip={grad_clip}",
                   "train.save_every=1", "train.keep_last=10", "train.max_steps=4")
    assert rc == 0
    assert "step 2: non-finite gradient norm, step skipped" in capsys.readouterr().out
    recs = metrics(run)
    assert [recs[s]["skipped"] for s in range(1, 5)] == [0, 1, 0, 0]
    assert math.isfinite(recs[2]["loss"]) and not math.isfinite(recs[2]["grad_norm"])
    assert all(math.isfinite(recs[s]["grad_norm"]) for s in (1, 3, 4)) and recs[4]["bad_steps_total"] == 1
    ckpts = run / "checkpoints"
    w1, w2, w3 = (checkpoint_weights(ckpts / f"step_{s:08d}") for s in (1, 2, 3))
    floats = lambda w: {k: v for k, v in w.items() if v.is_floating_point()}  # noqa: E731
    assert_same_weights(floats(w1), floats(w2))
    assert all(torch.isfinite(v).all() for v in floats(w3).values())
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
    assert json.loads((ckpts / "step_00000003/mmpretrain.json").read_text())["counters"]["bad_steps_total"] == 1


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


def test_overflow_skips_are_reported_apart_and_never_stop_the_run(tiny, tmp_path, monkeypatch, capsys):
    """Three overflow skips with train.max_bad_steps=2: the run goes on; metrics count them as
    overflow_skips, not as bad steps; a bad step after them starts its own count."""
    from mmpretrain.trainer import loop

    real = loop.finish_step
    calls = []

    def overflowing(model, optimizer, ctx, result):
        calls.append(1)
        if len(calls) <= 3:
            optimizer.zero_grad(set_to_none=True)
            result.overflow = True
        else:
            real(model, optimizer, ctx, result)

    monkeypatch.setattr(loop, "finish_step", overflowing)
    run = tmp_path / "run"
    assert run_train(tiny, run, "train.max_bad_steps=2", "train.inject_nan_steps=[4]") == 0
    recs = metrics(run)
    assert [recs[s]["overflow"] for s in range(1, 7)] == [1, 1, 1, 0, 0, 0]
    assert [recs[s]["skipped"] for s in range(1, 7)] == [0, 0, 0, 1, 0, 0]
    assert recs[6]["overflow_skips"] == 3 and recs[6]["bad_steps_total"] == 1
    counters = json.loads((run / "checkpoints/step_00000006/mmpretrain.json").read_text())["counters"]
    assert counters["overflow_skips"] == 3 and counters["bad_steps_total"] == 1
    assert "3 fp16 overflow skips" in capsys.readouterr().out


def test_triplet_loss_skips_the_feature_pass_and_allows_dropout(tiny, tmp_path, monkeypatch):
    """The feature cache is InfoNCE only: with the triplet loss no features pass runs, and
    train.feature_cache (the default) does not refuse dropout."""
    from mmpretrain.losses import FeatureCache

    def no_cache(*args, **kwargs):
        raise AssertionError("features pass run for a loss that ignores the cache")

    monkeypatch.setattr(FeatureCache, "from_local", no_cache)
    assert run_train(tiny, tmp_path / "run", "loss.contrastive=triplet", "data.batch_size=4",
                     "train.grad_accum_steps=2", "model.dropout=0.1", "train.max_steps=2") == 0
    assert sorted(metrics(tmp_path / "run")) == [1, 2]


def test_start_up_value_errors_are_one_line_and_loop_errors_are_not_swallowed(tiny, tmp_path, capsys,
                                                                               monkeypatch):
    # the loader refuses a batch larger than the data (a ValueError raised during set-up)
    assert run_train(tiny, tmp_path / "big", "data.batch_size=512") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("mmpretrain train")]
    assert len(lines) == 1 and lines[0].startswith("mmpretrain train: ") and "data.batch_size=512" in lines[0]

    from mmpretrain.trainer import loop

    def broken(*args, **kwargs):
        raise ValueError("a bug inside the training loop")

    monkeypatch.setattr(loop, "train_step", broken)
    with pytest.raises(ValueError, match="a bug inside the training loop"):
        run_train(tiny, tmp_path / "loop")


def test_one_helper_for_accelerate_reset_and_step_dir_names():
    """Trainer code resets Accelerate's state through ``accel.reset_accelerate_state`` and names
    step directories through ``checkpoint.step_dir_name`` only."""
    import inspect

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from mmpretrain.trainer import accel, checkpoint, loop

    Accelerator(cpu=True)
    assert PartialState._shared_state and AcceleratorState._shared_state
    accel.reset_accelerate_state()
    assert not PartialState._shared_state and not AcceleratorState._shared_state
    for module in (loop, accel):
        source = inspect.getsource(module)
        assert source.count("_reset_state(") == (2 if module is accel else 0), module.__name__
        assert ":08d}" not in source, module.__name__
    assert ":08d}" in inspect.getsource(checkpoint.step_dir_name)


@pytest.mark.parametrize("override, message", [
    ("data.batch_sise=8", "unknown config key 'data.batch_sise'; did you mean 'data.batch_size'"),
    ("data.train_shards=[/nonexistent/train-*.tar]", "no shards match '/nonexistent/train-*.tar'"),
    ("train.resume=/nonexistent/step_00000003", "no such checkpoint directory"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
])
def test_bad_config_fails_before_any_work(tiny, tmp_path, capsys, override, message):
    run = tmp_path / "run"
    assert run_train(tiny, run, override) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_launch_checks():
    from types import SimpleNamespace

    from mmpretrain.config import load_config
    from mmpretrain.trainer import accel

    with pytest.raises(accel.LaunchError, match=r"data.batch_size=6 .* not divisible by the world size 4"):
        accel.per_rank_batch_size(6, 4)
    # Accelerate seeing 1 process where the launcher started 2 (e.g. `accelerate launch --cpu`)
    info = accel.LaunchInfo(launched=True, world_size=2, use_deepspeed=False, has_gpu=False)
    one = SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(name="NO"))
    with pytest.raises(accel.LaunchError, match="Accelerate sees 1 process"):
        accel.check_accelerator(one, info)
    # DeepSpeed asked for, DDP running (ACCELERATE_USE_CPU with a DeepSpeed plugin)
    info_ds = accel.LaunchInfo(launched=False, world_size=1, use_deepspeed=True, has_gpu=False)
    ddp = SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(name="NO"))
    with pytest.raises(accel.LaunchError, match="DEEPSPEED was launched"):
        accel.check_accelerator(ddp, info_ds)

    cfg = load_config(None, ["data.batch_size=16", "train.grad_accum_steps=2", "optim.grad_clip=0.5",
                             "train.mixed_precision=bf16", "model.width=64"])
    ds = json.loads((REPO / "launch/zero3.json").read_text())
    filled = accel.fill_deepspeed_config(ds, cfg, world_size=4)
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["train_batch_size"] == 32
    assert filled["gradient_accumulation_steps"] == 2 and filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["zero_optimization"]["stage"] == 3 and filled["zero_optimization"]["reduce_bucket_size"] == 4096
    ds["gradient_accumulation_steps"] = 4
    with pytest.raises(accel.LaunchError, match=r"gradient_accumulation_steps=4 .* train.grad_accum_steps gives 2"):
        accel.fill_deepspeed_config(ds, cfg, world_size=4)


def test_deepspeed_with_accelerate_use_cpu_is_refused(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_train(tiny, tmp_path / "run") == 2
    assert "ACCELERATE_USE_CPU" in capsys.readouterr().err


def test_cli_entry_point_runs_as_a_module(tiny, tmp_path):
    """`python -m mmpretrain train` (the README command) on the debug config."""
    run = tmp_path / "run"
    proc = run_subprocess([sys.executable, "-m", "mmpretrain", "train", "--config", str(tiny),
                           f"train.output_dir={run}", "train.max_steps=2", "train.save_every=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout
    assert (run / "checkpoints/step_00000002/mmpretrain.json").is_file()


def test_grad_checkpointing_gives_the_same_losses(tiny, tmp_path):
    assert run_train(tiny, tmp_path / "plain", "train.max_steps=3") == 0
    assert run_train(tiny, tmp_path / "ckpt", "train.max_steps=3", "model.grad_checkpointing=true") == 0
    assert_losses_close(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"), 1e-6)
