"""Trainer helpers shared by the trainer, resume and 2-process trainer tests: a tiny debug
config over tiny synthetic shards, an in-process ``run_train``, and metrics/checkpoint readers."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import _proc

from mmpretrain.train import main

REPO = Path(__file__).resolve().parents[1]  # tests/_trainutil.py -> the checkout

TINY = """\
seed: 0
data:
  train_shards: ["{shards}/train-*.tar"]
  val_shards: "{shards}/val-*.tar"
  tokenizer: {shards}/tokenizer
  max_length: 16
  image_size: 32
  global_batch_size: 8
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


def make_shards(base: Path) -> Path:
    """256 train + 2x16 val synthetic samples of 32 px in ``base/trainer_shards`` (made once),
    byte-identical in every session, tokenizer included (``_fixed_tokenizer``)."""
    from mmpretrain.data.synthetic import generate

    out = base / "trainer_shards"
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        generate(str(out), num_samples=256, num_val=16, samples_per_shard=64, image_size=32, vocab_size=300,
                 train_tokenizer=False)
        _fixed_tokenizer(out)
    return out


def _fixed_tokenizer(shards: Path) -> None:
    """``shards/tokenizer``: the BERT-style WordPiece pipeline of ``train_tokenizer`` with a
    vocabulary fixed by the train captions alone. The trained one is not reproducible (the
    ``tokenizers`` trainer breaks ties in hash-map order: 3 trainings gave 3 different
    tokenizer.json; between two of them 30 ids moved and 16 sub-word tokens came and went),
    so the token ids, hence the embedding rows and the losses of every test on these shards,
    changed from session to session. Here: the special tokens (ids 0-4, as trained), the characters, their
    ``##`` continuations (sorted), then every other caption word by falling count (ties by
    spelling): 150 tokens, each caption word one token (a trained vocabulary of 300 split a few
    rare words: 16 of the 288 train + val captions tokenized differently in one session)."""
    from collections import Counter

    from tokenizers import models

    from mmpretrain.data.tokenizer import SPECIAL_TOKENS, read_captions, train_tokenizer

    captions = read_captions(sorted(str(p) for p in shards.glob("train-*.tar")))
    fast = train_tokenizer(captions, None, 300)
    backend = fast.backend_tokenizer
    words = Counter(w for c in captions for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(c)))
    chars = sorted({ch for w in words for ch in w})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{ch}" for ch in chars),
             *sorted((w for w in words if w not in chars), key=lambda w: (-words[w], w))]
    backend.model = models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
    fast.save_pretrained(str(shards / "tokenizer"))


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


def assert_unchanged_across_a_skipped_step(before: dict, after: dict) -> None:
    """Weights bit-equal across a skipped (non-finite) step; only the model's forward counter (the
    ``itm_step`` buffer) moved by one, since the skipped step still ran forward."""
    assert before.keys() == after.keys()
    for name in before:
        if name.endswith("itm_step"):
            assert torch.equal(before[name] + 1, after[name]), name
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed across the world-size change"


def run_subprocess(args: list[str], env_extra: dict | None = None, timeout: float = 300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    env.pop("ACCELERATE_USE_CPU", None)
    return _proc.run(args, timeout=timeout, cwd=REPO, env=env)
