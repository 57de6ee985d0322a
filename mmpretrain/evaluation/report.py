"""The evaluation report: ``report.png`` and a self-contained ``report.html``.

``report.png`` is the one-image overview (to share or paste): a title naming the checkpoint,
its config and the step; the training curves of the run (from its ``metrics.jsonl``, when there
is one: one panel per loss part with the raw values, an exponential moving average beside them
and the validation loss of ``train.eval_every`` as points; the learning rate), each axis
labelled, integer step ticks; the results as bar charts against their chance level (retrieval
Recall@k contrastive and ITM re-ranked, the compositional test and the ITM hard negatives,
zero-shot classification, each once it exists); and the example grid: caption -> contrastive
top-5 images beside the ITM re-ranked top 5 (right ones framed green) and the right image when
it is in neither, image -> the two top-5 caption lists and the right caption when it is missed.

``report.html`` (one file, every image embedded, no network) carries the numbers as tables —
what was evaluated (checkpoint, config, step, held-out set), the recall table with its chance
row, the compositional and hard-negative tables, the zero-shot tables — then embeds
``report.png`` (charts, not tables: the two never repeat a table) and lists the examples with
their scores, their ITM re-ranked positions and the rank of the right answer. The zero-shot
results come from ``metrics["zero_shot"]`` or from ``zero_shot.json`` beside the report (as
``mmpretrain eval --classify`` writes it before the retrieval evaluation).

Inputs are plain data (no model, no process group): the metrics dict, the run history and an
``examples`` dict built by ``evaluate.py`` (``itm`` and ``truth`` are optional)::

    {"text_queries": [{"caption": str, "images": [uint8 HxWx3], "correct": [bool],
                       "scores": [float],
                       "itm": {"images": [...], "correct": [bool], "scores": [float | None]},
                       "truth": {"rank": int, "itm_rank": int | None, "image": uint8 HxWx3}}],
     "image_queries": [{"image": uint8 HxWx3, "captions": [str], "correct": [bool],
                        "scores": [float],
                        "itm": {"captions": [str], "correct": [bool], "scores": [float | None]},
                        "truth": {"rank": int, "itm_rank": int | None, "caption": str}}]}

Ranks are 1-based positions in the score order; ``truth["image"]`` is only needed when the right
image is not in the contrastive top 5. ITM scores are the ones the re-ranking ordered by
(``eval.itm_rerank_score``: the ITM log-odds, plus the contrastive logit for ``itm+itc``).

Look at it in a browser: ``docs/evaluation.md`` (Outputs) has the headless-Chromium screenshot.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
from pathlib import Path

import numpy as np

GREEN, RED = "#1a9641", "#d7191c"
CONTRASTIVE_COLOR, ITM_COLOR, CHANCE_COLOR = "#4477aa", "#ee7733", "#222222"


def read_history(path: str | Path | None) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (one JSON object per line; unreadable lines skipped)."""
    if path is None or not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_zero_shot(out_dir: str | Path, step) -> dict | None:
    """The ``zero_shot`` results of ``out_dir/zero_shot.json`` when it was written for ``step``."""
    path = Path(out_dir) / ZERO_SHOT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or (step is not None and data.get("step") != step):
        return None
    zs = data.get("zero_shot")
    return zs if isinstance(zs, dict) else None


# ----------------------------------------------------------------------------- curves

LOSS_NAMES = {
    "loss": "total loss (weighted sum)",
    "loss_itc": "contrastive loss (ITC)",
    "loss_itm": "image-text matching loss (ITM)",
    "loss_mlm": "masked language modelling loss (MLM)",
    "loss_triplet": "triplet loss",
}
_LOSS_ORDER = list(LOSS_NAMES)


def loss_label(key: str) -> str:
    """A readable name for a ``metrics.jsonl`` loss key (``loss_itc``, ``val/loss_itc``, ...)."""
    name = key.split("/")[-1]
    return LOSS_NAMES.get(name, name.replace("_", " "))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curves(history: list[dict]) -> dict:
    """``{"train": {loss key: (steps, values)}, "val": {loss key: (steps, values)}, "lr": (steps,
    values)}`` from the training rows of a ``metrics.jsonl`` (rows with a numeric ``step``; the
    trainer's ``{"step", "eval": ...}`` rows are not curves). Validation keys drop their ``val/``
    prefix, so ``val["loss_itc"]`` sits beside ``train["loss_itc"]``; keys in plotting order."""
    train: dict[str, tuple[list, list]] = {}
    val: dict[str, tuple[list, list]] = {}
    lr: tuple[list, list] = ([], [])
    for row in sorted((r for r in history if _number(r.get("step")) and "eval" not in r),
                      key=lambda r: r["step"]):
        step = int(row["step"])
        for key, value in row.items():
            if not _number(value):
                continue
            if key.startswith("val/") and key[4:].startswith("loss"):
                dest, name = val, key[4:]
            elif "/" not in key and key.startswith("loss"):
                dest, name = train, key
            elif key == "lr":
                lr[0].append(step)
                lr[1].append(value)
                continue
            else:
                continue
            dest.setdefault(name, ([], []))
            dest[name][0].append(step)
            dest[name][1].append(float(value))

    def order(d):
        return dict(sorted(d.items(), key=lambda kv: (_LOSS_ORDER.index(kv[0]) if kv[0] in _LOSS_ORDER
                                                      else len(_LOSS_ORDER), kv[0])))
    return {"train": order(train), "val": order(val), "lr": lr}


def smoothing_weight(n: int) -> float:
    """The EMA weight for ``n`` logged steps: none below 10 points, else ``1 - 10/n`` capped at
    0.9 (about the last ``n/10`` steps, at most 10)."""
    return 0.0 if n < 10 else min(0.9, 1.0 - 10.0 / n)


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's (the first point is not pulled
    towards 0): ``ema_i = (w ema_{i-1} + (1-w) x_i) / (1 - w^(i+1))`` with ``ema_{-1} = 0``."""
    out, last = [], 0.0
    for i, v in enumerate(values):
        last = weight * last + (1.0 - weight) * v
        out.append(last / (1.0 - weight ** (i + 1)) if weight else v)
    return out


# ----------------------------------------------------------------------------- tables

def chance_recall(num_images: int, num_captions: int, k: int) -> tuple[float, float]:
    """Expected ``(I→T R@k, T→I R@k)`` in % of a random ranking: a caption query has one right
    image among ``num_images`` (``k / num_images``); an image query is right when any of its
    ``num_captions / num_images`` captions (rounded, at least 1) is among the top ``k`` of
    ``num_captions`` (``1 - C(N - c, k) / C(N, k)``)."""
    u, n = int(num_images), int(num_captions)
    if u <= 0 or n <= 0:
        return float("nan"), float("nan")
    c = max(1, round(n / u))
    miss = 1.0
    for j in range(min(k, n)):
        miss *= max(n - c - j, 0) / (n - j)
    return 100.0 * (1.0 - miss), 100.0 * min(k, u) / u


def recall_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the recall table: one row per ranking (contrastive, ITM re-ranked),
    then the chance level of a random ranking on this held-out set."""
    ks = sorted({int(k.split("@")[1]) for k in metrics if k.startswith("i2t_R@")})
    header = ["ranking"] + [f"I→T R@{k}" for k in ks] + [f"T→I R@{k}" for k in ks] + ["mean R", "seconds"]
    rows = []
    for prefix, name, secs in (("", "contrastive", "contrastive_seconds"),
                               ("itm_", f"ITM re-ranked (top {metrics.get('itm_rerank_k', '?')})", "itm_seconds")):
        if f"{prefix}mean_recall" not in metrics:
            continue
        row = [name]
        row += [f"{metrics[f'{prefix}i2t_R@{k}']:.1f}" for k in ks]
        row += [f"{metrics[f'{prefix}t2i_R@{k}']:.1f}" for k in ks]
        row += [f"{metrics[f'{prefix}mean_recall']:.1f}", f"{metrics.get(secs, 0.0):.2f}"]
        rows.append(row)
    if rows and _number(metrics.get("num_images")) and _number(metrics.get("num_captions")):
        chance = [chance_recall(metrics["num_images"], metrics["num_captions"], k) for k in ks]
        values = [c[0] for c in chance] + [c[1] for c in chance]
        rows.append(["chance (random ranking)"] + [f"{v:.1f}" for v in values]
                    + [f"{sum(values) / len(values):.1f}", "—"])
    return header, rows


KIND_LABELS = {
    "color_swap": "colours swapped between two objects",
    "relation_flip": "relation flipped (left↔right, above↔below)",
    "shape_replace": "one shape replaced by one not in the image",
    "size_swap": "sizes swapped between two objects",
}
KIND_SHORT = {"color_swap": "colour\nswap", "relation_flip": "relation\nflip", "shape_replace": "shape\nreplaced",
              "size_swap": "size\nswap"}


def _pct(value) -> str:
    return "—" if value is None else f"{100.0 * value:.1f}"


def compositional_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the compositional table (accuracies in %, chance 50); no rows when
    the test did not run or was skipped."""
    comp = metrics.get("compositional")
    if not isinstance(comp, dict) or "kinds" not in comp:
        return [], []
    chance = _pct(comp.get("chance", 0.5))
    header = ["change", "trials", "cosine: true > changed (%)", "ITM: true > changed (%)", "chance (%)"]
    rows = [[KIND_LABELS.get(kind, kind), str(r.get("n", 0)), _pct(r.get("cosine_acc")), _pct(r.get("itm_acc")), chance]
            for kind, r in comp["kinds"].items()]
    return header, rows


def hard_negative_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and the row of the ITM hard-negative table (accuracies in %, chance 50)."""
    hard = metrics.get("itm_hard_negatives")
    if not isinstance(hard, dict) or "balanced_acc" not in hard:
        return [], []
    header = ["positives", "hard negatives", "accuracy on positives (%)", "accuracy on negatives (%)",
              "balanced accuracy (%)", "chance (%)"]
    return header, [[str(hard["num_positives"]), str(hard["num_negatives"]), _pct(hard["positive_acc"]),
                     _pct(hard["negative_acc"]), _pct(hard["balanced_acc"]), "50.0"]]


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    e = html.escape
    attr = f" class='{cls}'" if cls else ""
    return (f"<table{attr}><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def _quality_html(metrics: dict) -> list[str]:
    """The compositional and the ITM hard-negative sections (a note when skipped)."""
    e = html.escape
    parts: list[str] = []
    comp = metrics.get("compositional")
    if isinstance(comp, dict):
        parts.append("<h2 id='compositional'>Compositional test</h2>")
        header, rows = compositional_rows(metrics)
        if rows:
            parts += [
                f"<p>{comp.get('num_images', '?')} held-out images. Each trial pairs an image with its "
                "caption and the same caption with exactly one thing changed (rendered by the "
                "generator, so only the changed words differ, and the changed caption is false for the "
                "image); it counts as right when the true caption scores higher. "
                f"{e(str(comp.get('ties', 'a tie counts 0.5')).capitalize())}; chance is 50 %.</p>",
                _html_table(header, rows, "compositional")]
            if comp.get("dropped_truncated"):
                parts.append(f"<p>{comp['dropped_truncated']} (image, change) pairs had their change past "
                             "<code>data.max_length</code> tokens and are not counted.</p>")
            if not comp.get("itm", True):
                parts.append("<p>ITM column empty: the model has no trained ITM head.</p>")
            ex = comp.get("examples") or {}
            if ex:
                parts.append("<table class='examples'><tr><th>change</th><th>true caption</th>"
                             "<th>changed caption</th></tr>")
                parts += [f"<tr><td>{e(KIND_LABELS.get(k, k))}</td><td>{e(v['caption'])}</td>"
                          f"<td>{e(v['changed'])}</td></tr>" for k, v in ex.items()]
                parts.append("</table>")
        else:
            parts.append(f"<p class='note'>Not run: {e(str(comp.get('skipped', 'no result')))}.</p>")
    hard = metrics.get("itm_hard_negatives")
    if isinstance(hard, dict):
        parts.append("<h2 id='itm-hard-negatives'>ITM on held-out hard negatives</h2>")
        header, rows = hard_negative_rows(metrics)
        if rows:
            parts += ["<p>Positives: every caption with its image. Negatives: for each image its "
                      "highest-cosine caption of another image, and for each caption its highest-cosine "
                      "other image (distinct pairs). Right when the ITM head says match for a positive "
                      "and no match for a negative; a tie counts 0.5; balanced accuracy is the mean of "
                      "the two, chance 50 %.</p>", _html_table(header, rows, "hard-negatives")]
        else:
            parts.append(f"<p class='note'>Not run: {e(str(hard.get('skipped', 'no result')))}.</p>")
    return parts


ZERO_SHOT_FILE = "zero_shot.json"


def zero_shot_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one labelling's zero-shot summary (accuracies in %)."""
    header = ["scores", "top-1 (%)", "top-5 (%)", "mean per-class top-1 (%)"]
    rows = [["contrastive (cosine to the class embedding)", _pct1(result.get("top1")), _pct1(result.get("top5")),
             _pct1(result.get("mean_per_class"))]]
    itm = result.get("itm") or {}
    if "top1" in itm:
        rows.append([f"ITM re-scored top {itm.get('k')} ({itm.get('score')}, {itm.get('prompts')} prompt)",
                     _pct1(itm["top1"]), _pct1(itm.get("top5")), _pct1(itm.get("mean_per_class"))])
    rows.append(["chance (uniform guess)", _pct1(result.get("chance_top1")), _pct1(result.get("chance_top5")),
                 _pct1(result.get("chance_top1"))])
    return header, rows


def _pct1(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _zero_shot_results(metrics: dict) -> dict:
    zs = metrics.get("zero_shot")
    if not isinstance(zs, dict):
        return {}
    return {str(f): r for f, r in zs.items() if isinstance(r, dict) and "top1" in r}


def _zero_shot_html(metrics: dict) -> list[str]:
    e = html.escape
    results = _zero_shot_results(metrics)
    if not results:
        return []
    parts = ["<h2 id='zero-shot'>Zero-shot classification</h2>",
             "<p>Each class name is put into every prompt template; the class embedding is the "
             "normalised mean of the template embeddings, and an image's class is the one whose "
             "embedding is closest (ties count against the image). ITM re-scoring ranks the top k "
             "classes by the fused ITM head's log-odds of the image with the class's prompts.</p>"]
    for field, r in results.items():
        parts.append(f"<h3>{e(field)}: {r.get('num_classes')} classes, {r.get('num_images')} images "
                     f"({e(str(r.get('source')))})</h3>")
        header, rows = zero_shot_rows(r)
        parts.append(_html_table(header, rows, "zero-shot"))
        itm = r.get("itm") or {}
        if "skipped" in itm:
            parts.append(f"<p class='note'>ITM re-scoring not run: {e(str(itm['skipped']))}.</p>")
        parts.append(f"<p>Templates ({e(str(r.get('templates_from')))}): "
                     + ", ".join(f"<code>{e(t)}</code>" for t in r.get("templates", [])) + "</p>")
        per = r.get("per_class") or {}
        ipc = itm.get("per_class") or {}
        head = ["class", "images", "top-1 (%)", "top-5 (%)"] + (["ITM top-1 (%)"] if ipc else [])
        body = [[c, str(v.get("n")), _pct1(v.get("top1")), _pct1(v.get("top5"))]
                + ([_pct1(ipc.get(c, {}).get("top1"))] if ipc else []) for c, v in per.items()]
        per_class = _html_table(head, body, "per-class")
        # a long per-class table is folded (one click); a short one stays open
        parts.append(per_class if len(body) <= 12 else
                     f"<details><summary>per-class accuracy ({len(body)} classes)</summary>{per_class}</details>")
    return parts


# ----------------------------------------------------------------------------- what was evaluated

def find_config(checkpoint: str | Path | None, history_source: str | Path | None) -> Path | None:
    """The config the evaluated model was trained with: ``config.yaml`` in the checkpoint
    directory, in its run directory (``RUN/checkpoints/step_N`` -> ``RUN``), or beside the
    run's ``metrics.jsonl``; an export's ``config.json``."""
    candidates: list[Path] = []
    if checkpoint:
        ck = Path(checkpoint)
        candidates += [ck / "config.yaml", ck.parent.parent / "config.yaml", ck / "config.json"]
    if history_source:
        candidates.append(Path(history_source).parent / "config.yaml")
    return next((p for p in candidates if p.is_file()), None)


def provenance(metrics: dict, checkpoint=None, config=None, shards=None,
               history_note: str = "") -> list[tuple[str, str]]:
    """``(label, text)`` rows naming what the report is about: step, checkpoint, config, the
    held-out and zero-shot sets, the processes and the training history."""
    step = metrics.get("step", "?")
    rows = [("step", str(step))]
    rows.append(("checkpoint", str(checkpoint) if checkpoint else
                 f"— (evaluated during training: the run's weights at step {step})"))
    rows.append(("config", str(config) if config else "— (no config.yaml found beside the checkpoint or run)"))
    if "num_images" in metrics:
        held = f"{metrics.get('num_images')} images, {metrics.get('num_captions')} captions"
        if shards:
            held += f" from {shards if isinstance(shards, str) else ', '.join(map(str, shards))}"
        rows.append(("held-out set", held))
    zs = _zero_shot_results(metrics)
    by_source: dict[str, list[str]] = {}
    for f, r in zs.items():
        by_source.setdefault(f"{r.get('num_images')} images from {r.get('source')}", []).append(
            f"{f} ({r.get('num_classes')} classes)")
    if by_source:
        rows.append(("zero-shot set", "; ".join(f"{src}, labelled by {', '.join(fields)}"
                                                 for src, fields in by_source.items())))
    rows.append(("processes", str(metrics.get("world_size", 1))))
    if history_note:
        rows.append(("training curves", history_note))
    return rows


def _subtitle(metrics: dict) -> str:
    world = metrics.get("world_size", 1)
    procs = f"{world} process" + ("" if world == 1 else "es")
    if "num_images" not in metrics and "zero_shot" in metrics:  # mmpretrain eval --classify-only
        return f"step {metrics.get('step', '?')} · zero-shot classification only · {procs}"
    return (f"step {metrics.get('step', '?')} · {metrics.get('num_images', '?')} held-out images, "
            f"{metrics.get('num_captions', '?')} captions · {procs}")


# ----------------------------------------------------------------------------- PNG

def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _bar_chart(ax, categories: list[str], series: list[tuple[str, list, str]], chance: list, title: str,
               ylabel: str = "%") -> None:
    """Grouped bars (``series``: (label, values or None per category, colour)), each value
    written above its bar, and a dashed chance segment over every category that has one."""
    x = np.arange(len(categories), dtype=float)
    width = 0.8 / max(len(series), 1)
    for i, (label, values, color) in enumerate(series):
        pos = x - 0.4 + width * (i + 0.5)
        heights = [np.nan if v is None else float(v) for v in values]
        ax.bar(pos, np.nan_to_num(heights, nan=0.0), width * 0.92, label=label, color=color)
        for p, h in zip(pos, heights):
            if not math.isnan(h):
                ax.text(p, h + 1.0, f"{h:.0f}" if h >= 10 else f"{h:.1f}", ha="center", va="bottom", fontsize=7)
    drawn = False
    for xi, c in zip(x, chance):
        if c is None or (isinstance(c, float) and math.isnan(c)):
            continue
        ax.hlines(c, xi - 0.45, xi + 0.45, colors=CHANCE_COLOR, linestyles="--", lw=1.3,
                  label=None if drawn else "chance")
        drawn = True
    ax.set_xticks(x)
    ax.set_xticklabels(categories, fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11, pad=24)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series) + 1, frameon=False)


def _chart(*args):
    """A ``draw(ax)`` bound to this chart's data (a bare lambda would see the loop's last values)."""
    return lambda ax: _bar_chart(ax, *args)


def _result_charts(metrics: dict) -> list[tuple[float, callable]]:
    """(relative width, draw(ax)) of each results chart that has data."""
    charts = []
    ks = sorted({int(k.split("@")[1]) for k in metrics if k.startswith("i2t_R@")})
    if "mean_recall" in metrics and ks:
        cats = [f"I→T R@{k}" for k in ks] + [f"T→I R@{k}" for k in ks] + ["mean R"]
        keys = [f"i2t_R@{k}" for k in ks] + [f"t2i_R@{k}" for k in ks] + ["mean_recall"]
        series = [("contrastive", [metrics.get(k) for k in keys], CONTRASTIVE_COLOR)]
        if "itm_mean_recall" in metrics:
            series.append((f"ITM re-ranked (top {metrics.get('itm_rerank_k', '?')})",
                           [metrics.get("itm_" + k) for k in keys], ITM_COLOR))
        if _number(metrics.get("num_images")) and _number(metrics.get("num_captions")):
            ch = [chance_recall(metrics["num_images"], metrics["num_captions"], k) for k in ks]
            chance = [c[0] for c in ch] + [c[1] for c in ch]
            chance.append(sum(chance) / len(chance))
        else:
            chance = [None] * len(cats)
        charts.append((max(2.0, 0.35 * len(cats)), _chart(cats, series, chance, "retrieval: Recall@k (%)",
                                                            "recall (%)")))
    comp = metrics.get("compositional")
    hard = metrics.get("itm_hard_negatives")
    has_comp = isinstance(comp, dict) and "kinds" in comp
    has_hard = isinstance(hard, dict) and "balanced_acc" in hard
    if has_comp or has_hard:
        kinds = list(comp["kinds"]) if has_comp else []
        cats = [KIND_SHORT.get(k, k) for k in kinds] + (["hard negatives\n(balanced)"] if has_hard else [])
        pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
        cos = [pct(comp["kinds"][k].get("cosine_acc")) for k in kinds] + ([None] if has_hard else [])
        itm = [pct(comp["kinds"][k].get("itm_acc")) for k in kinds] + ([pct(hard["balanced_acc"])] if has_hard else [])
        series = [("cosine", cos, CONTRASTIVE_COLOR), ("ITM", itm, ITM_COLOR)]
        chance = [100.0 * comp.get("chance", 0.5) if has_comp else 50.0] * len(kinds) + ([50.0] if has_hard else [])
        charts.append((max(1.6, 0.4 * len(cats)), _chart(cats, series, chance,
                                                           "compositional test: true caption preferred (%)",
                                                           "accuracy (%)")))
    zs = _zero_shot_results(metrics)
    if zs:
        cats, con, itm, chance = [], [], [], []
        for field, r in zs.items():
            for top in ("1", "5"):
                cats.append(f"{field}\ntop-{top}")
                con.append(r.get(f"top{top}"))
                itm.append((r.get("itm") or {}).get(f"top{top}"))
                chance.append(r.get(f"chance_top{top}"))
        series = [("contrastive", con, CONTRASTIVE_COLOR)]
        if any(v is not None for v in itm):
            series.append(("ITM re-scored", itm, ITM_COLOR))
        charts.append((max(1.4, 0.45 * len(cats)), _chart(cats, series, chance, "zero-shot classification (%)",
                                                            "accuracy (%)")))
    return charts


def _draw_curves(fig, spec, history: list[dict]) -> None:
    from matplotlib.ticker import MaxNLocator

    c = curves(history)
    keys = list(c["train"]) + [k for k in c["val"] if k not in c["train"]]
    keys = keys[:4]
    n = len(keys) + 1
    sub = spec.subgridspec(1, n, wspace=0.3)
    if not keys and not c["lr"][0]:
        ax = fig.add_subplot(sub[0, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "training curves: no metrics.jsonl found for this run", ha="center", va="center",
                transform=ax.transAxes, color="gray", fontsize=11)
        return
    colors = ["#4477aa", "#228833", "#aa3377", "#ccbb44"]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(sub[0, i])
        ax.grid(alpha=0.3)
        color = colors[i % len(colors)]
        if key in c["train"]:
            s, v = c["train"][key]
            w = smoothing_weight(len(v))
            ax.plot(s, v, color=color, lw=1.0, alpha=0.35 if w else 1.0, label="training (raw)")
            if w:
                ax.plot(s, smooth(v, w), color=color, lw=2.2, label=f"training (smoothed, EMA {w:.2f})")
        if key in c["val"]:
            s, v = c["val"][key]
            ax.plot(s, v, "o-", color="#ee7733", ms=4, lw=1.2, label="validation (held-out)")
        ax.set_title(loss_label(key), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    ax = fig.add_subplot(sub[0, n - 1])
    ax.grid(alpha=0.3)
    if c["lr"][0]:
        ax.plot(c["lr"][0], c["lr"][1], color="tab:purple", lw=1.6)
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
    else:
        ax.text(0.5, 0.5, "no learning-rate history", ha="center", va="center", transform=ax.transAxes,
                color="gray")
    ax.set_title("learning rate (schedule)", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _image_cell(ax, img, ok: bool, title: str, title_color: str = "black") -> None:
    ax.imshow(img)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_edgecolor(GREEN if ok else RED)
        side.set_linewidth(5 if ok else 1.5)
    ax.set_title(title, fontsize=8, color=GREEN if ok else title_color)


def _fmt_itm(score) -> str:
    return "" if score is None else f" {score:+.2f}"


def itm_heading(metrics: dict) -> str:
    """'ITM re-ranked top 5 (itm+itc score)': the re-ranking and the score its examples show."""
    mode = metrics.get("itm_rerank_score")
    return f"ITM re-ranked top 5 ({mode} score)" if mode else "ITM re-ranked top 5 (ITM score)"


def _draw_text_query(fig, spec, q: dict, with_itm: bool, with_truth: bool, first: bool, itm_head: str) -> None:
    ratios = [2.6] + [1] * 5 + ([0.25] + [1] * 5 if with_itm else []) + ([0.25, 1] if with_truth else [])
    sub = spec.subgridspec(1, len(ratios), width_ratios=ratios, wspace=0.12)
    ax = fig.add_subplot(sub[0, 0])
    ax.axis("off")
    ax.text(0.0, 0.5, "\n".join(textwrap.wrap("“" + q["caption"] + "”", 30)), va="center", fontsize=9,
            transform=ax.transAxes)
    ax.set_title("caption → images", fontsize=8, color="gray", loc="left")
    col = 1
    for j, (img, ok, sc) in enumerate(zip(q["images"], q["correct"], q["scores"])):
        a = fig.add_subplot(sub[0, col + j])
        _image_cell(a, img, ok, f"#{j + 1}  cos {sc:.3f}")
        if first and j == 0:
            a.annotate("contrastive top 5", (0, 1.32), xycoords="axes fraction", fontsize=9, fontweight="bold")
    col += 5
    itm = q.get("itm")
    if with_itm:
        col += 1
        if itm:
            for j, (img, ok, sc) in enumerate(zip(itm["images"], itm["correct"], itm["scores"])):
                a = fig.add_subplot(sub[0, col + j])
                _image_cell(a, img, ok, f"#{j + 1}{_fmt_itm(sc)}")
                if first and j == 0:
                    a.annotate(itm_head, (0, 1.32), xycoords="axes fraction",
                               fontsize=9, fontweight="bold")
        col += 5
    truth = q.get("truth")
    if with_truth:
        col += 1
        if truth and truth.get("image") is not None and not any(q["correct"]) and \
                not any((itm or {}).get("correct", [])):
            a = fig.add_subplot(sub[0, col])
            where = f"cos #{truth['rank']}" + (f"\nITM #{truth['itm_rank']}" if truth.get("itm_rank") else "")
            _image_cell(a, truth["image"], True, where)
            a.annotate("right image", (0, 1.45), xycoords="axes fraction", fontsize=9, fontweight="bold",
                       color=GREEN)


def _caption_lines(ax, x: float, head: str, captions, correct, scores, fmt) -> None:
    ax.text(x, 1.0, head, va="top", fontsize=9.5, fontweight="bold", transform=ax.transAxes)
    for j, (cap, ok, sc) in enumerate(zip(captions, correct, scores)):
        line = f"#{j + 1}{fmt(sc)} {'✔' if ok else '✘'} {_short(cap, 70 if ok else 74)}"  # bold is wider
        ax.text(x, 0.86 - 0.145 * j, line, va="top",
                fontsize=9.5, color=GREEN if ok else "black", fontweight="bold" if ok else "normal",
                transform=ax.transAxes)


def _draw_image_query(fig, spec, q: dict, with_itm: bool, itm_head: str) -> None:
    sub = spec.subgridspec(1, 2, width_ratios=[1, 13], wspace=0.05)
    ax = fig.add_subplot(sub[0, 0])
    ax.imshow(q["image"])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("image → captions", fontsize=8, color="gray", loc="left")
    ax = fig.add_subplot(sub[0, 1])
    ax.axis("off")
    _caption_lines(ax, 0.0, "contrastive top 5 (cosine)", q["captions"], q["correct"], q["scores"],
                   lambda s: f" {s:.3f}")
    itm = q.get("itm")
    if with_itm and itm:
        _caption_lines(ax, 0.5, itm_head, itm["captions"], itm["correct"], itm["scores"],
                       _fmt_itm)
    truth = q.get("truth")
    if truth and truth.get("caption") and not any(q["correct"]):
        where = f"cos #{truth['rank']}" + (f", ITM #{truth['itm_rank']}" if truth.get("itm_rank") else "")
        ax.text(0.0, 0.86 - 0.145 * 5, f"right caption ({where}): {_short(truth['caption'], 140)}", va="top",
                fontsize=9.5, color=GREEN, fontweight="bold", transform=ax.transAxes)


def build_figure(metrics: dict, history: list[dict], examples: dict, about: list[tuple[str, str]] | None = None):
    """The ``report.png`` figure (matplotlib ``Figure``, Agg): title and provenance, training
    curves, results charts, example grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tq, iq = examples.get("text_queries", []), examples.get("image_queries", [])
    with_itm = any(q.get("itm") for q in tq + iq)
    with_truth = any((q.get("truth") or {}).get("image") is not None and not any(q["correct"])
                     and not any((q.get("itm") or {}).get("correct", [])) for q in tq)
    charts = _result_charts(metrics)
    # (height in inches, what): spacer rows leave room for axis labels, legends and titles
    rows: list[tuple[float, str]] = [(2.7, "curves")]
    if charts:
        rows += [(1.0, ""), (2.6, "charts")]
    for i in range(len(tq)):
        rows += [(1.0 if i == 0 else 0.45, ""), (1.35, "text")]
    for i in range(len(iq)):
        rows += [(0.9 if i == 0 else 0.3, ""), (1.75, "image")]
    head = 1.2
    total = head + sum(h for h, _ in rows) + 0.6
    fig = plt.figure(figsize=(16, total))
    gs = fig.add_gridspec(len(rows), 1, height_ratios=[h for h, _ in rows], hspace=0.0, top=1.0 - head / total,
                          bottom=0.6 / total, left=0.05, right=0.985)
    fig.text(0.05, 1.0 - 0.3 / total, f"mmpretrain evaluation report — {_subtitle(metrics)}", fontsize=15,
             fontweight="bold", va="center")
    info = dict(about or [])
    for i, key in enumerate(k for k in ("checkpoint", "config") if k in info):
        text = info[key] if len(info[key]) <= 200 else "…" + info[key][-199:]  # keep the path's end
        fig.text(0.05, 1.0 - (0.62 + 0.24 * i) / total, f"{key}: {text}", fontsize=9.5, color="#333333",
                 va="center")
    _draw_curves(fig, gs[0], history)
    spec = {kind: [gs[i] for i, (_, k) in enumerate(rows) if k == kind] for kind in ("charts", "text", "image")}
    if charts:
        widths = [w for w, _ in charts]
        if sum(widths) < 6.3:  # a lone chart keeps the width it has beside the others, not the whole row
            widths.append(6.3 - sum(widths))
        sub = spec["charts"][0].subgridspec(1, len(widths), width_ratios=widths, wspace=0.22)
        for i, (_, draw) in enumerate(charts):
            draw(fig.add_subplot(sub[0, i]))
    for i, (q, cell) in enumerate(zip(tq, spec["text"])):
        _draw_text_query(fig, cell, q, with_itm, with_truth, first=i == 0, itm_head=itm_heading(metrics))
    for q, cell in zip(iq, spec["image"]):
        _draw_image_query(fig, cell, q, with_itm, itm_heading(metrics))
    return fig


def render_png(path: str | Path, metrics: dict, history: list[dict], examples: dict,
               about: list[tuple[str, str]] | None = None) -> None:
    import matplotlib.pyplot as plt

    fig = build_figure(metrics, history, examples, about)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- HTML

def _png_b64(img: np.ndarray, size: int = 112) -> str:
    from PIL import Image

    im = Image.fromarray(np.asarray(img, dtype=np.uint8))
    im = im.resize((size, size), Image.NEAREST if im.width < size else Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _rank_text(truth: dict | None, what: str) -> str:
    """'right image: contrastive #7, ITM #2' (empty without a rank)."""
    if not truth or not truth.get("rank"):
        return ""
    text = f"right {what}: contrastive #{truth['rank']}"
    if truth.get("itm_rank"):
        text += f", ITM re-ranked #{truth['itm_rank']}"
    return text


def _text_query_html(q: dict, itm_head: str) -> str:
    e = html.escape
    parts = [f"<div class='q text-query'><div class='cap'>“{e(q['caption'])}”</div>"]
    for j, (img, ok, sc) in enumerate(zip(q["images"], q["correct"], q["scores"])):
        parts.append(f"<div class='img'><img class='{'hit' if ok else 'miss'}' "
                     f"src='data:image/png;base64,{_png_b64(img)}'><br>#{j + 1} cos {sc:.3f}</div>")
    notes = []
    itm = q.get("itm")
    if itm:
        # the ITM top 5 by their contrastive positions (the images themselves are in report.png)
        pos = []
        for img, ok, sc in zip(itm["images"], itm["correct"], itm["scores"]):
            c = next((j + 1 for j, other in enumerate(q["images"]) if other is img or np.array_equal(other, img)), None)
            mark = "✔" if ok else "✘"
            pos.append(f"<span class='{'hit' if ok else ''}'>"
                       + (f"= cos #{c}" if c else "from below the contrastive top 5")
                       + (f" ({sc:+.2f})" if sc is not None else "") + f" {mark}</span>")
        notes.append(f"<b>{e(itm_head)}:</b> " + " · ".join(f"#{j + 1} {p}" for j, p in enumerate(pos)))
    truth = _rank_text(q.get("truth"), "image")
    if truth:
        missed = not any(q["correct"]) and not any((itm or {}).get("correct", []))
        notes.append(f"<span class='{'truth' if missed else ''}'>{e(truth)}</span>")
    if notes:
        parts.append("<div class='notes'>" + "<br>".join(notes) + "</div>")
    parts.append("</div>")
    return "".join(parts)


def _caption_list(captions, correct, scores, fmt) -> str:
    e = html.escape
    return "<ol>" + "".join(f"<li class='{'hit' if ok else ''}'>{fmt(sc)} {'✔' if ok else '✘'} {e(c)}</li>"
                            for c, ok, sc in zip(captions, correct, scores)) + "</ol>"


def _image_query_html(q: dict, itm_head: str) -> str:
    e = html.escape
    cols = ["<div class='col'><div class='head'>contrastive top 5 (cosine)</div>"
            + _caption_list(q["captions"], q["correct"], q["scores"], lambda s: f"{s:.3f}") + "</div>"]
    itm = q.get("itm")
    if itm:
        cols.append(f"<div class='col'><div class='head'>{e(itm_head)}</div>"
                    + _caption_list(itm["captions"], itm["correct"], itm["scores"],
                                    lambda s: "" if s is None else f"{s:+.2f}") + "</div>")
    truth = q.get("truth") or {}
    tail = ""
    if truth.get("caption") and not any(q["correct"]):
        tail = f"<div class='truth'>{e(_rank_text(truth, 'caption'))}: {e(truth['caption'])}</div>"
    return (f"<div class='q image-query'><img src='data:image/png;base64,{_png_b64(q['image'])}'>"
            f"<div><div class='cols'>{''.join(cols)}</div>{tail}</div></div>")


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1280px;color:#222}"
    "table{border-collapse:collapse;margin:0.6em 0 1.2em}"
    "td,th{border:1px solid #ccc;padding:4px 10px;text-align:center}"
    "th{background:#f3f3f3}table.about td,table.about th{text-align:left}table.about th{width:9em}"
    "table.about td{font-family:monospace;font-size:13px}tr.chance td{color:#555;font-style:italic}"
    ".q{display:flex;align-items:center;gap:10px;margin:14px 0;flex-wrap:wrap}.cap{width:260px;font-style:italic}"
    ".hit{outline:5px solid " + GREEN + "}.miss{outline:1px solid " + RED + "}"
    ".img{text-align:center;font-size:11px}li.hit,span.hit{outline:none;color:" + GREEN + ";font-weight:bold}"
    ".notes{flex-basis:100%;font-size:13px;margin-left:270px}.truth{color:" + GREEN + ";font-weight:bold}"
    ".cols{display:flex;gap:2em}.col .head{font-weight:bold;font-size:13px}.col ol{margin:4px 0;padding-left:1.6em}"
    "table.examples td{text-align:left}.note{color:#666}img.overview{max-width:100%;border:1px solid #ddd}"
    "pre{background:#f6f6f6;padding:1em;overflow:auto}")


def render_html(path: str | Path, metrics: dict, png_path: str | Path | None, examples: dict,
                history_note: str = "", about: list[tuple[str, str]] | None = None) -> None:
    e = html.escape
    about = about if about is not None else provenance(metrics, history_note=history_note)
    header, rows = recall_rows(metrics)
    table = "<table class='recall'><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
    table += "".join(f"<tr{' class=chance' if row[0].startswith('chance') else ''}>"
                     + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    table += "</table>"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mmpretrain evaluation report — step "
        f"{e(str(metrics.get('step', '?')))}</title><style>{STYLE}</style></head><body>",
        "<h1>mmpretrain evaluation report</h1>",
        f"<p>{e(_subtitle(metrics))}</p>",
        "<table class='about'>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in about) + "</table>",
        _contents(metrics, examples, png_path),
        *(["<h2 id='recall'>Recall (%)</h2>", table,
           "<p>Ties count against the query: rank = number of wrong candidates scoring at least as high "
           "as the best right one. An image query is right if any of its captions is retrieved. Chance: "
           "the expected recall of a random ranking of this set (a caption has 1 right image among "
           f"{metrics.get('num_images', '?')}; an image has about "
           f"{_per_image(metrics)} right captions among {metrics.get('num_captions', '?')}).</p>"]
          if rows else []),
        *_quality_html(metrics),
        *_zero_shot_html(metrics),
    ]
    if png_path is not None and Path(png_path).is_file():
        b64 = base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
        parts += ["<h2 id='figure'>Figure (report.png)</h2>",
                  "<p class='note'>The training curves (raw and smoothed, validation loss as points), the "
                  "results above as charts against their chance level, and the examples below with the "
                  "ITM re-ranked top 5 beside the contrastive one and the right image when neither has it.</p>",
                  f"<img class='overview' alt='report.png' src='data:image/png;base64,{b64}'>"]
    tq, iq = examples.get("text_queries", []), examples.get("image_queries", [])
    if tq or iq:
        mode = metrics.get("itm_rerank_score")
        parts.append("<h2 id='caption-queries'>Caption → top-5 images (contrastive ranking; right images "
                     "framed green)</h2>" if tq else "")
        parts.append("<p class='note'>cos: the cosine of the two embeddings. "
                     + ({"itm+itc": "itm+itc score: the ITM head's log-odds plus the contrastive logit "
                                    "(logit scale × cosine), the order of the ITM re-ranking. ",
                         "itm": "itm score: the ITM head's log-odds, the order of the ITM re-ranking. "}.get(mode, ""))
                     + "Positions are 1-based; past the re-ranked top k the ITM order is the contrastive one. "
                     "The figure above shows the ITM re-ranked images, and the right image when neither top 5 "
                     "has it.</p>")
        parts += [_text_query_html(q, itm_heading(metrics)) for q in tq]
    if iq:
        parts.append("<h2 id='image-queries'>Image → top-5 captions (right captions in green)</h2>")
        parts += [_image_query_html(q, itm_heading(metrics)) for q in iq]
    parts += ["<details><summary>metrics.json</summary>",
              f"<pre>{e(json.dumps(metrics, indent=2))}</pre></details>", "</body></html>"]
    Path(path).write_text("".join(parts), encoding="utf-8")


def _contents(metrics: dict, examples: dict, png_path) -> str:
    """One line of links to the sections this report has."""
    links = [("recall", "recall", "mean_recall" in metrics),
             ("compositional", "compositional test", isinstance(metrics.get("compositional"), dict)),
             ("itm-hard-negatives", "ITM hard negatives", isinstance(metrics.get("itm_hard_negatives"), dict)),
             ("zero-shot", "zero-shot classification", bool(_zero_shot_results(metrics))),
             ("figure", "figure: curves, charts, examples", png_path is not None and Path(png_path).is_file()),
             ("caption-queries", "caption → images", bool(examples.get("text_queries"))),
             ("image-queries", "image → captions", bool(examples.get("image_queries")))]
    return "<p class='toc'>" + " · ".join(f"<a href='#{a}'>{t}</a>" for a, t, ok in links if ok) + "</p>"


def _per_image(metrics: dict) -> str:
    u, n = metrics.get("num_images"), metrics.get("num_captions")
    return str(max(1, round(n / u))) if _number(u) and _number(n) and u else "?"


def write_report(out_dir: str | Path, metrics: dict, history: list[dict], examples: dict,
                 history_source: str | Path | None = None, checkpoint: str | Path | None = None,
                 shards=None) -> tuple[Path, Path]:
    """Write ``report.png`` then ``report.html`` (which embeds the PNG) into ``out_dir``.
    ``checkpoint`` (the evaluated directory) and ``shards`` (the held-out set) are named in both;
    the config is looked up beside the checkpoint or the run (``find_config``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "zero_shot" not in metrics:
        zero_shot = read_zero_shot(out, metrics.get("step"))
        if zero_shot:
            metrics = {**metrics, "zero_shot": zero_shot}
    png, page = out / "report.png", out / "report.html"
    steps = sum(1 for row in history if "loss" in row)
    note = (f"{steps} logged steps from {history_source}." if history_source and steps
            else "no metrics.jsonl found for this run.")
    about = provenance(metrics, checkpoint, find_config(checkpoint, history_source), shards, note)
    render_png(png, metrics, history, examples, about)
    render_html(page, metrics, png, examples, note, about)
    return png, page
