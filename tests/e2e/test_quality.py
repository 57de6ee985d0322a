"""`mmpretrain bench quality` end to end on a small synthetic set: the command the quality
figures in docs/BENCHMARKS.md come from prints every headline number, per seed, as its last
line."""

from __future__ import annotations

import json

import pytest

from mmpretrain import cli

pytestmark = pytest.mark.e2e


def test_bench_quality_prints_every_headline_number_per_seed(tmp_path, capsys):
    rc = cli.main(["bench", "quality", "--steps", "4", "--seeds", "0,1", "--shards", str(tmp_path / "shards"),
                   "--num-samples", "192", "--num-val", "24", "--out", str(tmp_path / "runs"),
                   "data.global_batch_size=16", "data.num_workers=0", "eval.batch_size=64"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["bench"] == "quality" and result["steps"] == 4 and result["seeds"] == [0, 1]
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    for run in result["runs"]:
        assert 0 <= run["mean_recall"] <= 100 and 0 <= run["itm_mean_recall"] <= 100
        assert 0 <= run["itm_hard_negative_acc"] <= 1
        assert set(run["compositional"]) == {"color_swap", "relation_flip", "shape_replace", "size_swap"}
        for kind in run["compositional"].values():
            assert kind["n"] > 0 and 0 <= kind["cosine"] <= 1 and 0 <= kind["itm"] <= 1
        assert run["train_s"] > 0 and run["wall_s"] >= run["train_s"]
    assert result["mean"]["mean_recall"] == pytest.approx(
        sum(r["mean_recall"] for r in result["runs"]) / 2, abs=1e-3)
    # two seeds are two different runs (weights and data order)
    assert result["runs"][0]["mean_recall"] != result["runs"][1]["mean_recall"] or \
        result["runs"][0]["compositional"] != result["runs"][1]["compositional"]
    # each run trained exactly the budget and was evaluated on its own final checkpoint
    for seed in (0, 1):
        assert (tmp_path / "runs" / f"seed{seed}" / "checkpoints" / "step_00000004").is_dir()
        assert (tmp_path / "runs" / f"seed{seed}" / "eval" / "metrics.json").is_file()


def test_bench_quality_rejects_bad_seeds(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "quality", "--seeds", "a,b"])
    assert "--seeds" in capsys.readouterr().err
