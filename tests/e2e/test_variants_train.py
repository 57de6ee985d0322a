"""Every model variant, as shipped in configs/, trains on the synthetic shards through the real
trainer and its loss goes down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpretrain.data import cli as shards_cli
from mmpretrain.train import main as train_main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("variants") / "shards"
    assert shards_cli.main(["synthetic", "--out", str(out), "--num-samples", "1024", "--num-val", "16",
                            "--samples-per-shard", "256"]) == 0
    return out


def _contrastive_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss_itc"] for r in rows if "eval" not in r]


@pytest.mark.parametrize("config", ["tiny", "vlmo_tiny", "dual_encoder_tiny", "siamese_triplet"])
def test_variant_loss_goes_down_on_synthetic_shards(config, synthetic, tmp_path):
    run = tmp_path / config
    rc = train_main(["--config", str(REPO / "configs" / f"{config}.yaml"), f"train.output_dir={run}",
                     f"data.train_shards=[{synthetic}/train-*.tar]", f"data.val_shards={synthetic}/val-*.tar",
                     "data.batch_size=32", "data.num_workers=1", "train.max_steps=40", "optim.warmup_steps=5",
                     "optim.lr=2e-3", "train.log_every=100", "train.save_every=1000", "train.eval_at_end=false",
                     "train.tensorboard=false"])
    assert rc == 0
    itc = _contrastive_losses(run)
    assert len(itc) == 40
    first, last = sum(itc[:8]) / 8, sum(itc[-8:]) / 8
    assert last < 0.92 * first, f"{config}: contrastive loss {first:.3f} -> {last:.3f}"
