"""The evaluation report (mmpretrain/evaluation/report.py) on small hand-made inputs: the chance
level of the recall table against an enumeration, the smoothing and the curve split, and the
structure of report.html / report.png that a reader relies on (what was evaluated, the chance
row, the zero-shot and compositional results in both, ITM re-ranked examples and the right answer
when it was missed, labelled axes with integer step ticks, no table drawn into the PNG).
The command's own report: tests/unit/test_eval.py; the look in a browser: docs/evaluation.md."""

from __future__ import annotations

import base64
import itertools
import json
import re
from math import comb

import numpy as np
import pytest

from mmpretrain.evaluation import report as R


# ----------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_chance_recall_matches_an_enumeration_of_every_ranking(k):
    """3 images with 2 captions each: over all 720 caption orders an image query finds one of
    its 2 captions in the top k with the formula's probability; a caption query k / 3."""
    captions = range(6)
    mine = {0, 1}
    hits = sum(bool(mine & set(order[:k])) for order in itertools.permutations(captions))
    i2t, t2i = R.chance_recall(3, 6, k)
    assert i2t == pytest.approx(100.0 * hits / 720)
    assert t2i == pytest.approx(100.0 * min(k, 3) / 3)


def test_smoothing_is_a_debiased_ema():
    assert R.smooth([2.0] * 7, 0.8) == pytest.approx([2.0] * 7)  # no pull towards 0 at the start
    assert R.smooth([1.0, 3.0], 0.0) == [1.0, 3.0]
    # (0.5 * 0 + 0.5 * 1) / 0.5 = 1; (0.5 * 0.5 + 0.5 * 3) / 0.75 = 7/3
    assert R.smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, 7.0 / 3.0])
    assert R.smoothing_weight(9) == 0.0 and R.smoothing_weight(40) == pytest.approx(0.75)
    assert R.smoothing_weight(10_000) == 0.9


def test_curves_split_training_validation_and_learning_rate():
    history = [{"step": 2, "loss": 2.0, "loss_itc": 1.5, "lr": 2e-4, "itm_acc": 0.5, "time": 1.0},
               {"step": 1, "loss": 3.0, "loss_itc": 2.5, "lr": 1e-4},
               {"step": 2, "eval": {"mean_recall": 10.0}},  # the trainer's eval record: not a curve
               {"step": 2, "val/loss": 2.5, "val/loss_itc": 2.1, "loss_itm": float("nan")},
               {"loss": 9.0}]  # no step
    c = R.curves(history)
    assert list(c["train"]) == ["loss", "loss_itc"]
    assert c["train"] == {"loss": ([1, 2], [3.0, 2.0]), "loss_itc": ([1, 2], [2.5, 1.5])}
    assert c["val"] == {"loss": ([2], [2.5]), "loss_itc": ([2], [2.1])}
    assert c["lr"] == ([1, 2], [1e-4, 2e-4])
    assert R.loss_label("val/loss_itc") == "contrastive loss (ITC)"


# ----------------------------------------------------------------------------- the report

def _img(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, dtype=np.uint8)


def _inputs(tmp_path):
    """A run directory with a config, metrics with every section, a history with validation
    rows, and examples: one caption query whose right image is in neither top 5, one image query
    whose right caption only ITM finds."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000030"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    metrics = {"step": 30, "num_images": 10, "num_captions": 20, "world_size": 1, "itm_rerank_k": 8,
               "itm_rerank_score": "itm+itc",
               "contrastive_seconds": 0.5, "itm_seconds": 1.5}
    for prefix, base in (("", 10.0), ("itm_", 20.0)):
        for d in ("i2t", "t2i"):
            for k in (1, 5, 10):
                metrics[f"{prefix}{d}_R@{k}"] = base + k
        metrics[f"{prefix}mean_recall"] = base + 5.3
    metrics["compositional"] = {"num_images": 10, "chance": 0.5, "ties": "a tie counts 0.5", "itm": True,
                                "kinds": {"color_swap": {"n": 8, "cosine_acc": 0.625, "itm_acc": 0.75},
                                          "size_swap": {"n": 4, "cosine_acc": 0.5, "itm_acc": 0.25}},
                                "examples": {}}
    metrics["itm_hard_negatives"] = {"num_positives": 20, "num_negatives": 12, "positive_acc": 0.9,
                                     "negative_acc": 0.4, "balanced_acc": 0.65}
    zero_shot = {"label": {"top1": 37.5, "top5": 87.5, "mean_per_class": 36.0, "chance_top1": 12.5,
                           "chance_top5": 62.5, "num_classes": 8, "num_images": 16, "source": "cls/",
                           "templates": ["a {}."], "templates_from": "config",
                           "per_class": {"circle": {"n": 2, "top1": 50.0, "top5": 100.0}},
                           "itm": {"k": 5, "score": "itm+itc", "prompts": "best", "top1": 43.75, "top5": 87.5,
                                   "mean_per_class": 40.0, "per_class": {"circle": {"top1": 100.0}}}}}
    out = tmp_path / "eval"
    out.mkdir()
    # as `mmpretrain eval --classify` leaves it for the retrieval evaluation's report
    (out / R.ZERO_SHOT_FILE).write_text(json.dumps({"step": 30, "zero_shot": zero_shot}))
    history = [{"step": s, "loss": 3.0 - 0.05 * s, "loss_itc": 2.8 - 0.05 * s, "loss_itm": 0.69, "lr": 1e-4 * s}
               for s in range(1, 31)]
    history += [{"step": s, "val/loss": 3.1 - 0.05 * s, "val/loss_itc": 2.9 - 0.05 * s} for s in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    imgs = [_img(20 * i) for i in range(10)]
    examples = {
        "text_queries": [{
            "caption": "a <red> circle", "images": imgs[:5], "correct": [False] * 5,
            "scores": [0.5, 0.4, 0.3, 0.2, 0.1],
            "itm": {"images": [imgs[1], imgs[0], imgs[7], imgs[2], imgs[3]], "correct": [False] * 5,
                    "scores": [2.0, 1.0, 0.5, -1.0, None]},
            "truth": {"rank": 7, "itm_rank": 9, "image": imgs[9]}}],
        "image_queries": [{
            "image": imgs[4], "captions": ["c0", "c1", "c2", "c3", "c4"], "correct": [False] * 5,
            "scores": [0.9, 0.8, 0.7, 0.6, 0.5],
            "itm": {"captions": ["c9 right", "c0", "c1", "c2", "c3"], "correct": [True] + [False] * 4,
                    "scores": [3.0, 1.0, 0.0, -1.0, -2.0]},
            "truth": {"rank": 6, "itm_rank": 1, "caption": "c9 right"}}],
    }
    return out, metrics, history, examples, run, ckpt


def _table_rows(page: str, cls: str) -> list[list[str]]:
    table = re.search(rf"<table class='{cls}'>(.*?)</table>", page).group(1)
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table)]


def test_report_names_what_it_evaluated_and_carries_every_section(tmp_path):
    out, metrics, history, examples, run, ckpt = _inputs(tmp_path)
    png, page_path = R.write_report(out, metrics, history, examples, run / "metrics.jsonl", checkpoint=ckpt,
                                    shards="heldout/val-*.tar")
    page = page_path.read_text()
    about = dict(row for row in _table_rows(page, "about"))
    assert about["step"] == "30" and about["checkpoint"] == str(ckpt) and about["config"] == str(run / "config.yaml")
    assert about["held-out set"] == "10 images, 20 captions from heldout/val-*.tar"
    assert about["training curves"] == f"30 logged steps from {run / 'metrics.jsonl'}."
    assert "step 30" in page[:400]  # in the title

    recall = _table_rows(page, "recall")
    assert [r[0] for r in recall[1:]] == ["contrastive", "ITM re-ranked (top 8)", "chance (random ranking)"]
    # 10 images x 2 captions: I->T 1 - C(18, k) / C(20, k), T->I k / 10; the mean over the six
    i2t = [100 * (1 - comb(18, k) / comb(20, k)) for k in (1, 5, 10)]
    t2i = [10.0, 50.0, 100.0]
    expected = [f"{v:.1f}" for v in i2t + t2i] + [f"{sum(i2t + t2i) / 6:.1f}", "—"]
    assert recall[3][1:] == expected and expected[:3] == ["10.0", "44.7", "76.3"]

    zs = _table_rows(page, "zero-shot")
    assert zs[1][:2] == ["contrastive (cosine to the class embedding)", "37.5"]
    assert zs[-1] == ["chance (uniform guess)", "12.5", "62.5", "12.5"]
    comp = _table_rows(page, "compositional")
    assert comp[1] == ["colours swapped between two objects", "8", "62.5", "75.0", "50.0"]
    assert _table_rows(page, "hard-negatives")[1][4:] == ["65.0", "50.0"]

    # the missed caption query names where its right image ranked; ITM's top 5 by contrastive position
    assert "right image: contrastive #7, ITM re-ranked #9" in page
    assert "#1 <span class=''>= cos #2 (+2.00) ✘</span>" in page and "from below the contrastive top 5" in page
    assert "a &lt;red&gt; circle" in page
    # the image query: both lists side by side, and the right caption that the contrastive top 5 missed
    assert page.count("ITM re-ranked top 5 (itm+itc score)</div>") == 1
    assert "<li class='hit'>+3.00 ✔ c9 right</li>" in page
    assert "<div class='truth'>right caption: contrastive #6, ITM re-ranked #1: c9 right</div>" in page

    # one file, offline: the PNG embedded as is, example thumbnails, nothing fetched
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert base64.b64decode(embedded[0]) == png.read_bytes()
    assert len(embedded) == 1 + 5 + 1  # the figure, the caption query's top 5, the image query
    bare = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in bare and "<script" not in bare and "src='/" not in bare


def test_figure_has_labelled_curves_charts_not_tables_and_itm_examples(tmp_path):
    out, metrics, history, examples, run, ckpt = _inputs(tmp_path)
    metrics = {**metrics, "zero_shot": R.read_zero_shot(out, 30)}
    about = R.provenance(metrics, ckpt, run / "config.yaml", None, "")
    fig = R.build_figure(metrics, history, examples, about)
    try:
        texts = [t.get_text() for t in fig.texts]
        assert any("step 30" in t for t in texts) and f"checkpoint: {ckpt}" in texts
        assert f"config: {run / 'config.yaml'}" in texts
        axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
        assert not any(ax.tables for ax in fig.axes)  # the numbers' tables live in the HTML only
        for title in ("total loss (weighted sum)", "contrastive loss (ITC)", "image-text matching loss (ITM)"):
            ax = axes[title]
            assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "loss"
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert labels[:2] == ["training (raw)", "training (smoothed, EMA 0.67)"]
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)
        assert [t.get_text() for t in axes["contrastive loss (ITC)"].get_legend().get_texts()][-1] == \
            "validation (held-out)"
        assert "validation (held-out)" not in [t.get_text() for t in axes["image-text matching loss (ITM)"]
                                               .get_legend().get_texts()]
        assert axes["learning rate (schedule)"].get_ylabel() == "learning rate"
        for title, n_bars in (("retrieval: Recall@k (%)", 2 * 7), ("compositional test: true caption preferred (%)",
                                                                     2 * 3), ("zero-shot classification (%)", 2 * 2)):
            ax = axes[title]
            assert len(ax.patches) == n_bars and ax.get_ylabel().endswith("(%)")
            assert "chance" in [t.get_text() for t in ax.get_legend().get_texts()]
        # examples: 5 contrastive + 5 ITM + the right image for the caption query, the query image
        assert sum(1 for ax in fig.axes if ax.images) == 5 + 5 + 1 + 1
        assert "right image" in [t.get_text() for ax in fig.axes for t in ax.texts]
        rows = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert "ITM re-ranked top 5 (itm+itc score)" in rows
        assert any(r.startswith("#1 +3.00 ✔ c9 right") for r in rows)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_classify_only_report_without_history(tmp_path):
    """`--classify-only`: no recall table or chart, the zero-shot results in both files, and the
    missing history and config said as such."""
    zs = {"label": {"top1": 50.0, "top5": 100.0, "mean_per_class": 50.0, "chance_top1": 25.0,
                    "chance_top5": 100.0, "num_classes": 4, "num_images": 8, "source": "cls/",
                    "templates": ["a {}."], "templates_from": "config", "per_class": {}, "itm": {"skipped": "no ITM"}}}
    metrics = {"step": 3, "zero_shot": zs, "world_size": 2}
    _, page_path = R.write_report(tmp_path, metrics, [], {})
    page = page_path.read_text()
    assert "Recall (%)" not in page and "zero-shot classification only · 2 processes" in page
    about = dict(row for row in _table_rows(page, "about"))
    assert about["training curves"] == "no metrics.jsonl found for this run."
    assert about["checkpoint"].startswith("—") and about["config"].startswith("—")
    assert "ITM re-scoring not run: no ITM." in page
    fig = R.build_figure(metrics, [], {})
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert "zero-shot classification (%)" in titles and "retrieval: Recall@k (%)" not in titles
        assert any("no metrics.jsonl" in t.get_text() for ax in fig.axes for t in ax.texts)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
