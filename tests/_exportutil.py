"""Export/eval helpers: tiny synthetic shards, tiny-model overrides, and a checkpoint written
with the trainer's own ``save_checkpoint`` (shared by the export and evaluation tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmpretrain.config import load_config, to_dict

TINY = ["model.image_size=32", "data.image_size=32", "model.width=32", "model.depth=2", "model.num_heads=2",
        "model.embed_dim=16", "model.patch_size=8", "data.max_length=16", "model.max_text_length=16",
        "data.global_batch_size=8", "data.num_workers=0", "eval.batch_size=16", "eval.itm_rerank_k=4",
        "eval.num_examples=3"]
REPO = Path(__file__).resolve().parents[1]  # tests/_exportutil.py -> the checkout


def make_shards(directory: Path) -> Path:
    from mmpretrain.data.synthetic import generate

    if not (directory / "manifest.json").is_file():
        generate(str(directory), num_samples=16, num_val=12, samples_per_shard=8, image_size=32, vocab_size=200)
    return directory


def tiny_overrides(shards: Path, run_dir: Path, extra=()) -> list[str]:
    return TINY + [f"data.val_shards={shards}/val-*.tar", f"data.train_shards=[{shards}/train-*.tar]",
                   f"train.output_dir={run_dir}", *extra]


def make_checkpoint(run_dir: Path, shards: Path, extra=(), step: int = 3, seed: int = 0) -> Path:
    """A single-process checkpoint of a freshly initialised tiny model whose zero-initialised
    modality-type embeddings are made non-zero (so that folding them is really tested)."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from mmpretrain.models import build_model
    from mmpretrain.trainer.checkpoint import save_checkpoint

    cfg = load_config(None, tiny_overrides(shards, run_dir, extra))
    tok = AutoTokenizer.from_pretrained(str(shards / "tokenizer"))
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.loss, len(tok))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "type_embed" in name:
                p.normal_(0.0, 0.1)
    acc = Accelerator(cpu=True)
    model = acc.prepare(model)
    meta = {"config": to_dict(cfg), "vocab_size": len(tok), "distributed_type": "NO", "zero_stage": 0,
            "world_size": 1}
    return save_checkpoint(acc, run_dir / "checkpoints", step, meta, {}, tok)


SOURCE_KEYS = ("source_checkpoint", "source_distributed_type", "source_zero_stage")


def export_files(out: Path) -> dict[str, bytes]:
    """Every file of an export (relative path -> bytes), config.json without the fields that name
    where the checkpoint came from."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.relative_to(out).as_posix() == "config.json":
                cfg = json.loads(data)
                data = json.dumps({k: v for k, v in cfg.items() if k not in SOURCE_KEYS}, sort_keys=True).encode()
            files[p.relative_to(out).as_posix()] = data
    return files
