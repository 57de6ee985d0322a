"""The README runs: its walkthrough block is executed verbatim, and the main command runs (with
smaller sizes). That every command and file it names exists: tests/unit/test_docs.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import _proc

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def walkthrough_commands() -> list[str]:
    block = README.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    body = block.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in body.strip().splitlines() if line.strip() and not line.startswith("#")]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture
def workdir(tmp_path):
    """A directory laid out like the repository root (configs/, launch/), so the README's
    relative paths work without writing into the checkout."""
    for name in ("configs", "launch"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def test_walkthrough_runs_verbatim(workdir):
    commands = walkthrough_commands()
    assert len(commands) >= 6 and sum(" shards stats " in c for c in commands) == 1
    for cmd in commands:
        proc = _proc.run(["bash", "-c", cmd], timeout=400, cwd=workdir, env=_env())
        assert proc.returncode == 0, f"README command failed: {cmd}\n{proc.stderr[-3000:]}"
        if " shards stats " in cmd:
            stats = json.loads(proc.stdout.strip().splitlines()[-1])
            assert stats  # stats printed a JSON summary as its last line
    metrics = json.loads((workdir / "runs/demo/eval/metrics.json").read_text())
    assert {"i2t_R@1", "t2i_R@1", "mean_recall", "itm_mean_recall"} <= set(metrics)
    assert (workdir / "runs/demo/eval/report.html").is_file()
    assert (workdir / "runs/demo/export/model.safetensors").is_file()
    assert (workdir / "runs/demo-zero2/export/model.safetensors").is_file()
    # the resumed run continued from step 20: one metrics row per step, 1..30, no repeats
    steps = [json.loads(l)["step"] for l in (workdir / "runs/demo/metrics.jsonl").read_text().splitlines()
             if "loss" in l]
    assert steps == list(range(1, 31))


def own_data_block() -> str:
    block = README.split("<!-- own-data:start -->", 1)[1].split("<!-- own-data:end -->", 1)[0]
    return block.split("```bash", 1)[1].split("```", 1)[0]


def test_own_data_section_runs_verbatim(workdir):
    """"Your own data in five minutes": the block as one bash script (its first command is a
    python heredoc), exactly as written: a folder + CSV -> shards build -> train -> eval -> export."""
    script = own_data_block()
    assert "shards build --format csv" in script and "mmpretrain export" in script
    proc = _proc.run(["bash", "-euo", "pipefail", "-c", script], timeout=400, cwd=workdir, env=_env())
    assert proc.returncode == 0, f"README own-data block failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "shards/my_data: train: 48 samples in 1 shards" in proc.stdout
    for notice in ("Setting accelerator to CPU", "No CUDA runtime is found"):  # silenced: they do not apply
        assert notice not in proc.stdout + proc.stderr, notice
    assert "shards/my_data: val: 16 samples in 1 shards" in proc.stdout
    manifest = json.loads((workdir / "shards/my_data/manifest.json").read_text())
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 48, "val": 16}
    metrics = json.loads((workdir / "runs/my_data/eval/metrics.json").read_text())
    assert metrics["num_images"] == 16 and metrics["step"] == 5
    assert (workdir / "runs/my_data/export/model.safetensors").is_file()


def test_main_command_runs(workdir):
    first = README.split("## The two commands", 1)[1]
    assert "mmpretrain pipeline" in first and "bash launch/test.sh" in first
    proc = _proc.run(["mmpretrain", "pipeline", "--num-samples", "300", "--num-val", "40",
                      "train.max_steps=3", "data.global_batch_size=16", "eval.itm_rerank_k=4"],
                     timeout=600, cwd=workdir, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["num_images"] == 40 and metrics["num_captions"] == 80
    # the zero-shot classification of the labelled split (--num-val caps it at 40 images)
    assert set(metrics["zero_shot"]) == {"label", "color"} and metrics["zero_shot"]["color"]["num_images"] == 40
    assert (workdir / "runs/pipeline/export/config.json").is_file()

    # the README's "Using an exported model" snippet, on that export
    from PIL import Image

    Image.new("RGB", (80, 60), (200, 30, 30)).save(workdir / "photo.jpg")
    section = README.split("## Using an exported model", 1)[1]
    snippet = section.split("```python", 1)[1].split("```", 1)[0]
    check = snippet + "\nassert img.shape == txt.shape and img.shape[0] == 1\nassert 0.0 <= float(p_match[0]) <= 1.0\n"
    proc = _proc.run([sys.executable, "-c", check], timeout=300, cwd=workdir, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the ViLT snippet, on the export of the pipeline command it names (a model fused over the inputs)
    vilt = section.split("```python", 2)[2].split("```", 1)[0]
    assert "mmpretrain pipeline --config configs/tiny_itm.yaml --out runs/tiny_itm" in section
    proc = _proc.run(["mmpretrain", "pipeline", "--config", "configs/tiny_itm.yaml", "--out", "runs/tiny_itm",
                      "--num-samples", "300", "--num-val", "40", "train.max_steps=3", "data.global_batch_size=16",
                      "eval.itm_rerank_k=4"], timeout=600, cwd=workdir, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _proc.run([sys.executable, "-c", vilt + "\nassert 0.0 <= float(p_match[0]) <= 1.0\n"], timeout=300,
                     cwd=workdir, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
