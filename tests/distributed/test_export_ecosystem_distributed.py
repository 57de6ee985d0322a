"""A 2-process DeepSpeed ZeRO-3 checkpoint (gloo) exports the same files — every standard-library
form included — as the single-process fp32 checkpoint of the same weights (issue 10)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import _proc
from _exportutil import REPO, make_shards, tiny_overrides

from mmpretrain.export import export_checkpoint

pytestmark = pytest.mark.distributed

SOURCE_KEYS = ("source_checkpoint", "source_distributed_type", "source_zero_stage")


def _zero3_script() -> str:
    """The ZeRO-3 writer of test_export_distributed.py (one step, a checkpoint, the live weights)."""
    text = (Path(__file__).parent / "test_export_distributed.py").read_text()
    return text.split("ZERO3_SCRIPT = r'''", 1)[1].split("'''", 1)[0]


def _files(out: Path) -> dict[str, bytes]:
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.relative_to(out).as_posix() == "config.json":
                cfg = json.loads(data)
                data = json.dumps({k: v for k, v in cfg.items() if k not in SOURCE_KEYS}, sort_keys=True).encode()
            files[p.relative_to(out).as_posix()] = data
    return files


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def test_zero3_export_equals_the_single_process_export(shards, tmp_path):
    pytest.importorskip("sentence_transformers")
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from mmpretrain.config import load_config, to_dict
    from mmpretrain.models import build_model
    from mmpretrain.trainer.checkpoint import save_checkpoint

    script = tmp_path / "zero3_save.py"
    script.write_text(_zero3_script())
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(run), str(shards / "tokenizer"), *tiny_overrides(shards, run)]
    proc = _proc.run(cmd, timeout=300, env=env)
    live_file = run / "live_weights.safetensors"
    assert live_file.is_file(), proc.stderr[-3000:]  # DeepSpeed on gloo may abort at exit: judge by outputs
    zero_ckpt = run / "checkpoints" / "step_00000001"
    assert (zero_ckpt / "pytorch_model").is_dir()

    # the single-process fp32 equivalent: the same weights, config and tokenizer
    single = tmp_path / "single"
    cfg = load_config(None, tiny_overrides(shards, single))
    tok = AutoTokenizer.from_pretrained(str(shards / "tokenizer"))
    model = build_model(cfg.model, cfg.loss, len(tok))
    model.load_state_dict(load_file(str(live_file)), strict=True)
    acc = Accelerator(cpu=True)
    model = acc.prepare(model)
    meta = {"config": json.loads((zero_ckpt / "mmpretrain.json").read_text())["config"], "vocab_size": len(tok),
            "distributed_type": "NO", "zero_stage": 0, "world_size": 1}
    single_ckpt = save_checkpoint(acc, single / "checkpoints", 1, meta, {}, tok)

    a = _files(export_checkpoint(zero_ckpt, tmp_path / "a" / "export"))
    b = _files(export_checkpoint(single_ckpt, tmp_path / "b" / "export"))
    assert {"modules.json", "itm/model.safetensors", "text_encoder/model.safetensors",
            "image_encoder/model.safetensors", "README.md"} <= set(a)
    assert set(a) == set(b) and [k for k in a if a[k] != b[k]] == []
