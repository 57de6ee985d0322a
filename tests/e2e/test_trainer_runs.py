"""Trainer, single process on CPU, real training runs: a debug config trains and its loss goes
down; the run directory and checkpoint layout; gradient accumulation with the feature cache
(InfoNCE only); non-finite losses and gradients; fp16 overflow skips; the CLI entry point;
gradient checkpointing. Shared helpers are in tests/_trainutil.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from _exportutil import make_shards as make_eval_shards, tiny_overrides
from _trainutil import (REPO, assert_losses_close, assert_same_weights, checkpoint_weights, losses, make_config,
                        make_shards, metrics, run_subprocess, run_train)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_config(tmp_path_factory.getbasetemp())


# The learning check compares, step by step, the run's losses with those of the same run at a
# learning rate of 1e-12 (the initial model on the very same batches): per-step losses of batch 8
# vary by more between batches (about 0.3) than 30 steps of learning lower them, so "the last 5
# steps against the first 5" measured the batches as much as the training (it read 0.09 to 0.64
# for one seed, as the tokenizer trained with the shards changes from run to run). Paired mean
# gap over the last 10 steps on one 64-sample shard (8 batches, so each sample is seen ~4 times),
# measured over 4 shard/tokenizer draws at 1 and 2 threads at commit 92a3117: total loss
# 0.29-0.39, its contrastive part 0.27-0.36 (0.38 and 0.35 at 17763fb). The threshold is a third
# of the smallest; without learning the gap is 0 to rounding.
LEARNED = 0.1


def test_debug_config_trains_and_writes_the_run_layout(tiny, tmp_path, capsys):
    run, untrained = tmp_path / "run", tmp_path / "untrained"
    one_shard = f"data.train_shards=[{make_shards(tiny.parent)}/train-000000.tar]"
    common = ["train.max_steps=30", "train.log_every=10", one_shard, "optim.warmup_steps=3", "loss.itm_weight=0.5"]
    assert run_train(tiny, untrained, *common, "optim.lr=1e-12", "train.save_every=1000", "train.tensorboard=false") == 0
    capsys.readouterr()
    rc = run_train(tiny, run, *common, "train.save_every=10", "train.peak_tflops=0.5",
                   "train.eval_at_end=true", "eval.itm_rerank_k=4", "eval.report=false")
    assert rc == 0
    out = capsys.readouterr().out
    recs = metrics(run)
    assert sorted(recs) == list(range(1, 31))
    curve = [recs[s]["loss"] for s in range(1, 31)]
    assert all(math.isfinite(x) for x in curve)
    base = metrics(untrained)
    for key in ("loss", "loss_itc"):
        gap = sum(base[s][key] - recs[s][key] for s in range(21, 31)) / 10
        assert gap > LEARNED, f"{key}: the trained run is only {gap:.4f} below the untrained one on the same batches"
    for key in ("loss_itc", "loss_itm", "lr", "samples_per_s", "data_wait", "mem_gb", "grad_norm", "mfu",
                "overflow", "overflow_skips"):
        assert key in recs[30], key
    assert recs[30]["mfu"] > 0 and 0 <= recs[30]["data_wait"] <= 1
    # evaluation at the end, through mmpretrain.evaluation's run_evaluation
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert [e["step"] for e in evals] == [30] and "i2t_R@1" in evals[0]["eval"]
    assert json.loads((run / "eval/step_00000030/metrics.json").read_text())["step"] == 30
    # warmup then cosine: the peak once (the last warmup step), the last step exactly at min_lr_ratio * lr
    lr = 2e-3  # the debug config's optim.lr
    assert recs[1]["lr"] == pytest.approx(lr / 3)
    assert recs[3]["lr"] == pytest.approx(lr)
    assert recs[3]["lr"] > recs[4]["lr"] > recs[15]["lr"] > recs[29]["lr"] > recs[30]["lr"]
    assert recs[30]["lr"] == pytest.approx(0.1 * lr)
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
    # the data cursor: 30 batches of the 8 per epoch of the one shard (epochs count from 0)
    assert meta["counters"]["step"] == 30 and (meta["data_state"]["epoch"], meta["data_state"]["batches"]) == (3, 6)
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "data_state_0.json",
                 "tokenizer/tokenizer.json"):
        assert (ckpt / name).is_file(), name
    # mmpretrain.json is written last: no file in the directory is newer
    newest = max(p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file())
    assert (ckpt / "mmpretrain.json").stat().st_mtime_ns == newest


@pytest.fixture
def float64():
    """Build the model in float64 (the model casts its inputs to its weight dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_grad_accumulation_with_feature_cache_equals_the_big_batch(tiny, tmp_path, float64):
    """2 micro-batches of 4 with the feature cache = one batch of 8 (InfoNCE only: ITM mines
    negatives per micro-batch by design).

    In float64: in float32 the two runs' weights after 6 AdamW steps differed by up to 7e-6
    (Adam turns rounding noise in near-zero gradients into lr-sized steps, and the tokenizer
    trained with the shards changes from run to run), too close to any useful tolerance: a
    1/M error in the loss (M = micro-batches) moved the weights by only 4e-7 and the losses by
    7e-7, so float32 could not see it at all. In float64 the weights agree to 9e-15 and the
    gradient norms to 4e-15 (relative; 5 runs), that 1/M error moves the weights by 3e-10 and
    halves every gradient norm, and counting the logit-scale gradient M times moves the weights
    by 6e-5 and the losses by 1e-3.
    """
    common = ["loss.itm_weight=0", "train.save_every=100", "train.tensorboard=false"]
    assert run_train(tiny, tmp_path / "big", *common) == 0
    assert run_train(tiny, tmp_path / "acc", *common, "data.global_batch_size=4", "train.grad_accum_steps=2") == 0
    assert run_train(tiny, tmp_path / "nocache", *common, "data.global_batch_size=4", "train.grad_accum_steps=2",
                     "train.feature_cache=false") == 0
    big, acc, nocache = metrics(tmp_path / "big"), metrics(tmp_path / "acc"), metrics(tmp_path / "nocache")
    assert sorted(big) == sorted(acc) == list(range(1, 7))
    # losses are logged in float32: equal to its precision
    assert_losses_close([big[s]["loss"] for s in big], [acc[s]["loss"] for s in big], 1e-6)
    for s in big:  # the clipped-before norm of the whole step's gradient: the same, not M times or 1/M
        assert acc[s]["grad_norm"] == pytest.approx(big[s]["grad_norm"], rel=1e-9, abs=0), s
    w_big = checkpoint_weights(tmp_path / "big/checkpoints/step_00000006")
    w_acc = checkpoint_weights(tmp_path / "acc/checkpoints/step_00000006")
    assert w_big.keys() == w_acc.keys()
    floats = [k for k in w_big if w_big[k].is_floating_point()]
    assert floats and all(w_big[k].dtype == torch.float64 for k in floats)
    for k in w_big:
        torch.testing.assert_close(w_acc[k], w_big[k], rtol=0, atol=1e-11, msg=k)
    # without the cache each micro-batch contrasts only against itself: a different objective
    # (step 1: InfoNCE over 4 candidates instead of 8, measured 0.68 = about log 2 lower)
    assert abs(nocache[1]["loss"] - big[1]["loss"]) > 0.05


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
    assert run_train(tiny, tmp_path / "run", "loss.contrastive=triplet", "data.global_batch_size=4",
                     "train.grad_accum_steps=2", "model.dropout=0.1", "train.max_steps=2") == 0
    assert sorted(metrics(tmp_path / "run")) == [1, 2]


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


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory) -> Path:
    return make_eval_shards(tmp_path_factory.mktemp("evalshards") / "shards")


def test_trainer_evaluates_at_the_end_through_run_evaluation(eval_shards, tmp_path):
    """The real trainer (one process, 2 steps) calls run_evaluation: metrics.json, the report
    with the run's loss curves, and the eval row in the run's metrics.jsonl agree."""
    from mmpretrain import train

    shards = eval_shards
    out = tmp_path / "run"
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"),
            *tiny_overrides(shards, out, [f"data.tokenizer={shards}/tokenizer", "train.max_steps=2",
                                          "train.save_every=2", "train.tensorboard=false",
                                          "train.progress_bar=false", "optim.warmup_steps=1"])]
    assert train.main(argv) == 0
    eval_dir = out / "eval" / "step_00000002"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["num_captions"] == 24
    assert "2 logged steps from" in (eval_dir / "report.html").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r["eval"] for r in rows if "eval" in r]
    assert logged and logged[-1]["mean_recall"] == pytest.approx(metrics["mean_recall"])


def test_a_fresh_run_never_reuses_an_old_run_directory(tiny, tmp_path, capsys):
    """A fresh run into a directory holding a run is refused (one line naming resume and
    overwrite, nothing of the old run touched); train.overwrite=true starts truly afresh;
    train.resume=latest with no checkpoint says it starts fresh."""
    run = tmp_path / "run"
    assert run_train(tiny, run, "train.max_steps=2", "train.save_every=2") == 0
    old_metrics = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert run_train(tiny, run, "train.max_steps=1", "train.save_every=1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "train.resume=latest" in err[0] \
        and "train.overwrite=true" in err[0] and str(run) in err[0], err
    assert (run / "metrics.jsonl").read_bytes() == old_metrics
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000002"]
    assert run_train(tiny, run, "train.max_steps=1", "train.overwrite=true", "train.resume=latest") == 2
    assert "pass one of them" in capsys.readouterr().err

    assert run_train(tiny, run, "train.max_steps=1", "train.save_every=1", "train.overwrite=true") == 0
    assert "deleted checkpoints, metrics.jsonl" in capsys.readouterr().out
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000001"]
    assert sorted(metrics(run)) == [1]

    fresh = tmp_path / "fresh"
    assert run_train(tiny, fresh, "train.max_steps=1", "train.resume=latest") == 0
    assert "train.resume=latest: no checkpoint under" in capsys.readouterr().out


def test_disk_full_during_a_checkpoint_fails_in_one_line_and_keeps_the_earlier_ones(tiny, tmp_path, capsys,
                                                                                  monkeypatch):
    import errno

    import accelerate

    run = tmp_path / "run"
    real = accelerate.Accelerator.save_state
    calls = []

    def save_state(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:  # the step-2 checkpoint: the disk fills up half-way
            real(self, output_dir, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    assert run_train(tiny, run, "train.max_steps=3", "train.save_every=1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0] and "step_00000002.tmp" in err[0], err
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000001"]
    monkeypatch.undo()
    # an interrupted write left behind is removed at start-up, and the run resumes
    (run / "checkpoints" / "step_00000005.tmp").mkdir()
    assert run_train(tiny, run, "train.max_steps=3", "train.save_every=1", "train.resume=latest") == 0
    assert "removed interrupted checkpoint writes step_00000005.tmp" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_00000003"


def test_skipped_samples_by_reason_reach_metrics_as_they_grow(tiny, tmp_path):
    """A shard with bad samples beside the good ones: the skip counts by reason are in
    metrics.jsonl at every logging step (all ranks summed), not only at the end."""
    import shutil

    from _shardutil import write_raw_shard

    shards = tmp_path / "shards"
    shutil.copytree(Path(str(tiny).replace("trainer_tiny.yaml", "trainer_shards")), shards)
    write_raw_shard(str(shards / "train-000009.tar"),
                    [{"__key__": f"bad{i}", "jpg": b"not an image", "txt": "a cat"} for i in range(5)]
                    + [{"__key__": f"nocap{i}", "jpg": b"x"} for i in range(3)])
    run = tmp_path / "run"
    assert run_train(tiny, run, f"data.train_shards=[{shards}/train-*.tar]", "train.max_steps=8",
                     "train.log_every=2", "train.save_every=100") == 0
    recs = metrics(run)
    logged = {s: {k: v for k, v in r.items() if k.startswith("skipped_samples/")} for s, r in recs.items()}
    assert not logged[1] and not logged[3] and set(logged[8]) == {"skipped_samples/corrupt_image",
                                                                   "skipped_samples/missing_caption"}
    for key, planted in (("skipped_samples/corrupt_image", 5), ("skipped_samples/missing_caption", 3)):
        seen = [logged[s].get(key, 0) for s in (2, 4, 6, 8)]
        assert seen == sorted(seen) and 0 < seen[-1] <= planted, (key, seen)  # they grow as read
