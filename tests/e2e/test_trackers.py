"""Experiment trackers, the validation loss and the end-of-train summary, on real tiny runs.

The trackers run for real and offline: TensorBoard into the run directory, W&B with
WANDB_MODE=offline (read back with wandb's own reader of the .wandb log, ``wandb leet inspect
--json``), MLflow with a local file store (read back with ``MlflowClient.get_metric_history``).
Each must hold exactly the scalars of metrics.jsonl at the same steps, the config and the eval
metrics. The validation loss is recomputed from the last checkpoint, and the training losses
must not move when validation, evaluation and trackers are switched on."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _trainutil import losses, make_config, run_train

CHEAP_EVAL = ["eval.report=false", "eval.compositional=false", "eval.itm_hard_negatives=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_config(tmp_path_factory.getbasetemp())


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """{tracker key: {step: value}} as README documents it: train/<key> for every numeric field of
    a training record (val/<part> as is), eval/<key> for every numeric eval metric (nested groups
    joined by '/')."""
    want: dict[str, dict[int, float]] = {}

    def put(key, step, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        want.setdefault(key, {})[step] = float(value)

    def put_eval(prefix, tree, step):
        for k, v in tree.items():
            if isinstance(v, dict):
                put_eval(f"{prefix}{k}/", v, step)
            elif not (prefix == "eval/" and k == "step"):
                put(prefix + k, step, v)

    for rec in jsonl(run):
        step = rec["step"]
        if "eval" in rec:
            put_eval("eval/", rec["eval"], step)
        else:
            for k, v in rec.items():
                if k not in ("step", "time"):
                    put(k if k.startswith("val/") else f"train/{k}", step, v)
    return want


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def wandb_records(run: Path) -> list[dict]:
    [offline] = list((run / "wandb").glob("offline-run-*"))
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_every_tracker_holds_the_metrics_jsonl_scalars_the_config_and_the_eval_metrics(tiny, tmp_path, monkeypatch,
                                                                                       capsys):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # unset below: the trainer sets it for a file: URI
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    rc = run_train(tiny, run, "train.max_steps=4", "train.eval_every=2", "train.eval_at_end=true",
                   "train.val_batches=1", "train.report_to=tensorboard,wandb,mlflow", "train.run_name=trk",
                   "train.tracker_project=mmpretrain-test", *CHEAP_EVAL)
    assert rc == 0
    out = capsys.readouterr().out
    want = expected_scalars(run)
    # metrics.jsonl itself: val/* at the validation steps (eval_every and the last), eval at 2 and 4
    assert set(want["val/loss"]) == {2, 4} and {"val/loss_itc", "val/loss_itm", "val/itm_acc"} <= set(want)
    assert set(want["train/loss"]) == {1, 2, 3, 4} and set(want["eval/mean_recall"]) == {2, 4}
    assert not any(k.startswith("train/val") for k in want)
    config = flat(yaml.safe_load((run / "config.yaml").read_text()))

    # TensorBoard: the main event file holds every scalar (float32), the hparams file the config
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert tb.keys() == want.keys()
    for key, steps in want.items():
        assert tb[key] == pytest.approx(steps, rel=1e-6, abs=1e-6), key
    [hparams] = list((run / "tensorboard").glob("*/hparams.yml"))
    logged = yaml.safe_load(hparams.read_text())
    assert logged["train.max_steps"] == 4 and logged["model.width"] == 32 and logged["optim.lr"] == 2e-3
    assert logged["train.report_to"] == '["tensorboard", "wandb", "mlflow"]' and logged.keys() == config.keys()

    # W&B offline: history rows by step, the config, the run's name and project
    records = wandb_records(run)
    history: dict[str, dict[int, float]] = {}
    for r in records:
        if r["type"] == "history":
            item = r["history"]["item"]
            for k, v in item.items():
                if not k.startswith("_"):
                    history.setdefault(k, {})[int(item["_step"])] = float(v)
    assert history.keys() == want.keys()
    for key, steps in want.items():
        assert history[key] == pytest.approx(steps, rel=1e-12), key
    wb_config: dict = {}
    for r in records:
        if r["type"] == "run":
            wb_config.update(r["run"].get("config", {}).get("update", {}))
            assert r["run"]["display_name"] == "trk" and r["run"]["project"] == "mmpretrain-test"
        elif r["type"] == "config":
            wb_config.update(r["config"].get("update", {}))
    wb_config.pop("_wandb", None)
    assert wb_config.keys() == config.keys()
    assert wb_config["train.max_steps"] == 4 and wb_config["data.global_batch_size"] == 8

    # MLflow file store: one run, every metric's history ('@' -> '_at_'), the config as params
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("mmpretrain-test")
    [mrun] = client.search_runs([exp.experiment_id])
    assert mrun.info.run_name == "trk"
    logged_keys = set(mrun.data.metrics)
    assert logged_keys == {k.replace("@", "_at_") for k in want}
    for key, steps in want.items():
        hist = client.get_metric_history(mrun.info.run_id, key.replace("@", "_at_"))
        assert {m.step: m.value for m in hist} == pytest.approx(steps, rel=1e-12), key
    params = mrun.data.params
    assert params.keys() == config.keys() and params["train.max_steps"] == "4" and params["optim.lr"] == "0.002"

    # the summary names the trackers' data
    assert f"tracker: tensorboard --logdir {run / 'tensorboard'}" in out
    assert "tracker: wandb (offline): wandb sync " + str(run / "wandb" / "offline-run-") in out
    assert f"at {store}" in out


def _commands(out: str) -> dict[str, str]:
    """The summary's next commands: {'eval': ..., 'export': ..., 'resume' or 'train on': ...}."""
    lines = out[out.rindex("\nnext:") + 1:].splitlines()[1:]
    found = {}
    for line in lines:
        if not line.startswith("  ") or ": " not in line:
            break
        what, command = line.strip().split(": ", 1)
        found[what.split(" (")[0]] = command.strip()
    return found


def test_validation_loss_summary_and_unchanged_training(tiny, tmp_path, capsys):
    """val/loss is the loss of the first full held-out batches (recomputed from the checkpoint);
    training losses are bitwise those of a run without validation, evaluation or trackers; the
    summary's eval and train-on commands run as printed."""
    import torch
    from safetensors.torch import load_file

    from mmpretrain.cli import main as cli_main
    from mmpretrain.config import load_config
    from mmpretrain.data.loader import ShardLoader
    from mmpretrain.data.tokenizer import load_tokenizer
    from mmpretrain.models import build_model
    from mmpretrain.trainer.loop import model_inputs
    from mmpretrain.train import main as train_main

    plain, val = tmp_path / "plain", tmp_path / "val"
    assert run_train(tiny, plain, "train.max_steps=4", "train.report_to=none", *CHEAP_EVAL) == 0
    plain_out = capsys.readouterr().out
    assert run_train(tiny, val, "train.max_steps=4", "train.report_to=[]", "train.eval_every=2",
                     "train.val_batches=2", "eval.itm_rerank_k=0", *CHEAP_EVAL) == 0
    val_out = capsys.readouterr().out
    assert not (plain / "tensorboard").exists() and not (val / "tensorboard").exists()
    assert losses(plain) == losses(val)  # bitwise: validation and evaluation leave training alone

    # recompute val/* at step 4 from the step-4 checkpoint: 2 full batches of 8, eval mode, no grad
    cfg = load_config(str(val / "config.yaml"))
    tok = load_tokenizer(cfg.data.tokenizer, list(cfg.data.train_shards), cfg.data.vocab_size)
    model = build_model(cfg.model, cfg.loss, len(tok))
    model.load_state_dict(load_file(str(val / "checkpoints" / "step_00000004" / "model.safetensors")))
    model.eval()
    batches = [b for b in ShardLoader(cfg.data, tok, rank=0, world_size=1, seed=cfg.seed, train=False)
               if b["pixels"].shape[0] == 8][:2]
    assert len(batches) == 2
    with torch.no_grad():
        outs = [model(**model_inputs(b, torch.device("cpu"), cfg.data, torch.float32)) for b in batches]
    rec = [r for r in jsonl(val) if r["step"] == 4 and "eval" not in r][-1]
    for part in ("loss", "loss_itc", "loss_itm", "itm_acc"):
        assert rec[f"val/{part}"] == pytest.approx(sum(float(o[part]) for o in outs) / 2, rel=1e-5), part
    assert "val/logit_scale" not in rec
    assert f"val (step 4): loss {rec['val/loss']:.4f}" in val_out and "val @ step 2: loss" in val_out

    # the summary: final metrics, checkpoint, report, next commands that run as printed
    assert "summary: 4/4 steps, 32 samples" in plain_out and "train (step 4): loss" in plain_out
    assert f"checkpoint: {plain / 'checkpoints' / 'step_00000004'}" in plain_out
    assert "report: none" in plain_out and "eval (step" not in plain_out
    assert "eval (step 4): mean_recall" not in val_out  # eval_at_end is off in the tiny config
    commands = _commands(plain_out)
    assert set(commands) == {"eval", "export", "train on"}, commands
    assert commands["export"] == (f"mmpretrain export --checkpoint {plain / 'checkpoints' / 'step_00000004'} "
                                  f"--out {plain / 'export'}")
    argv = shlex.split(commands["eval"])
    assert argv[0] == "mmpretrain" and cli_main(argv[1:]) == 0
    assert (plain / "eval" / "step_00000004" / "metrics.json").is_file()
    argv = shlex.split(commands["train on"])
    assert argv[:2] == ["mmpretrain", "train"] and argv[-1] == "train.max_steps=8"
    assert train_main(argv[2:]) == 0
    assert sorted(r["step"] for r in jsonl(plain) if "eval" not in r) == list(range(1, 9))
