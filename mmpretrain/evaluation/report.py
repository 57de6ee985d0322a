"""The evaluation report: ``report.png`` and a self-contained ``report.html``.

Both show the same things, in the order a person asks for them:
1. loss and learning-rate curves of the run (from its ``metrics.jsonl``, when there is one),
2. the recall table (contrastive and ITM re-ranked),
   (HTML only) the compositional test per change kind (cosine and ITM accuracy beside the 50 %
   chance level, one example per kind) and the ITM accuracy on held-out hard negatives, or
   a one-line note when they were skipped, and (HTML only) the zero-shot classification
   (top-1/top-5, mean per-class and chance, contrastive and ITM re-scored, then per class)
   when ``metrics["zero_shot"]`` (or ``zero_shot.json`` beside the report, as
   ``mmpretrain eval --classify`` writes it before the retrieval evaluation) holds it,
3. example queries: caption -> top-5 images (right ones framed green, wrong ones red) and
   image -> top-5 captions (right ones green).

Inputs are plain data (no model, no process group): the metrics dict, the run history and an
``examples`` dict built by ``evaluate.py``::

    {"text_queries": [{"caption": str, "images": [uint8 HxWx3], "correct": [bool],
                       "scores": [float]}],
     "image_queries": [{"image": uint8 HxWx3, "captions": [str], "correct": [bool],
                        "scores": [float]}]}
"""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from pathlib import Path

import numpy as np

GREEN, RED = "#1a9641", "#d7191c"


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


def _curves(history: list[dict]) -> tuple[dict[str, tuple[list, list]], tuple[list, list]]:
    """{loss name: (steps, values)} and (steps, lr) from training rows that carry a step."""
    losses: dict[str, tuple[list, list]] = {}
    lr: tuple[list, list] = ([], [])
    for row in history:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = key.split("/")[-1]
            if name.startswith("loss") and "eval" not in key:
                losses.setdefault(key, ([], []))
                losses[key][0].append(step)
                losses[key][1].append(value)
            elif name == "lr":
                lr[0].append(step)
                lr[1].append(value)
    return losses, lr


def recall_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the recall table: one row per ranking (contrastive, ITM re-ranked)."""
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
    return header, rows


KIND_LABELS = {
    "color_swap": "colours swapped between two objects",
    "relation_flip": "relation flipped (left↔right, above↔below)",
    "shape_replace": "one shape replaced by one not in the image",
    "size_swap": "sizes swapped between two objects",
}


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


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
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
                _html_table(header, rows)]
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
                      "the two, chance 50 %.</p>", _html_table(header, rows)]
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


def _zero_shot_html(metrics: dict) -> list[str]:
    e = html.escape
    zs = metrics.get("zero_shot")
    if not isinstance(zs, dict) or not zs:
        return []
    parts = ["<h2 id='zero-shot'>Zero-shot classification</h2>",
             "<p>Each class name is put into every prompt template; the class embedding is the "
             "normalised mean of the template embeddings, and an image's class is the one whose "
             "embedding is closest (ties count against the image). ITM re-scoring ranks the top k "
             "classes by the fused ITM head's log-odds of the image with the class's prompts.</p>"]
    for field, r in zs.items():
        if not isinstance(r, dict) or "top1" not in r:
            continue
        parts.append(f"<h3>{e(str(field))}: {r.get('num_classes')} classes, {r.get('num_images')} images "
                     f"({e(str(r.get('source')))})</h3>")
        header, rows = zero_shot_rows(r)
        parts.append(_html_table(header, rows))
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
        parts.append(_html_table(head, body))
    return parts


def _subtitle(metrics: dict) -> str:
    if "num_images" not in metrics and "zero_shot" in metrics:  # mmpretrain eval --classify-only
        return f"step {metrics.get('step', '?')} · zero-shot classification only · {metrics.get('world_size', 1)} process(es)"
    return (f"step {metrics.get('step', '?')} · {metrics.get('num_images', '?')} images, "
            f"{metrics.get('num_captions', '?')} captions · {metrics.get('world_size', 1)} process(es)")


# ----------------------------------------------------------------------------- PNG

def render_png(path: str | Path, metrics: dict, history: list[dict], examples: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    tq, iq = examples.get("text_queries", []), examples.get("image_queries", [])
    ncols = 6  # query + top-5
    n_ex = len(tq) + len(iq)
    height = 5.2 + 1.9 * n_ex
    fig = plt.figure(figsize=(15, height))
    gs = GridSpec(2 + n_ex, ncols, figure=fig, height_ratios=[3.0, 1.6] + [1.9] * n_ex, hspace=0.55,
                  top=1.0 - 0.7 / height, bottom=0.2 / height, left=0.05, right=0.98)
    fig.suptitle(f"mmpretrain retrieval report — {_subtitle(metrics)}", fontsize=14, y=1.0 - 0.15 / height)

    losses, lr = _curves(history)
    ax = fig.add_subplot(gs[0, :3])
    ax.grid(alpha=0.3)
    for name, (s, v) in losses.items():
        ax.plot(s, v, label=name, lw=1.4)
    ax.set_title("training loss")
    ax.set_xlabel("step")
    if losses:
        ax.legend(fontsize=8, loc="best", framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "no metrics.jsonl found for this run", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    ax = fig.add_subplot(gs[0, 3:])
    if lr[0]:
        ax.plot(lr[0], lr[1], color="tab:purple", lw=1.4)
    else:
        ax.text(0.5, 0.5, "no learning-rate history", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    ax.set_title("learning rate")
    ax.set_xlabel("step")

    ax = fig.add_subplot(gs[1, :])
    ax.axis("off")
    header, rows = recall_rows(metrics)
    if rows:
        widths = [0.2] + [0.8 / (len(header) - 1)] * (len(header) - 1)
        table = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center", colWidths=widths)
        table.auto_set_font_size(False)
        table.set_fontsize(10)
        table.scale(1.0, 1.6)
    ax.set_title("zero-shot retrieval (recall %, pessimistic ties)" if rows
                 else "no retrieval evaluation (zero-shot classification only: see report.html)")

    r = 2
    for q in tq:
        ax = fig.add_subplot(gs[r, 0])
        ax.axis("off")
        ax.text(0.0, 0.5, "\n".join(textwrap.wrap("“" + q["caption"] + "”", 26)), va="center",
                fontsize=9, transform=ax.transAxes)
        ax.set_title("caption → images", fontsize=8, color="gray", loc="left")
        for j, (img, ok, sc) in enumerate(zip(q["images"], q["correct"], q["scores"])):
            ax = fig.add_subplot(gs[r, 1 + j])
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor(GREEN if ok else RED)
                side.set_linewidth(5 if ok else 1.5)
            ax.set_title(f"#{j + 1}  {sc:.3f}", fontsize=8, color=GREEN if ok else "black")
        r += 1
    for q in iq:
        ax = fig.add_subplot(gs[r, 0])
        ax.imshow(q["image"])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("image → captions", fontsize=8, color="gray", loc="left")
        ax = fig.add_subplot(gs[r, 1:])
        ax.axis("off")
        for j, (cap, ok, sc) in enumerate(zip(q["captions"], q["correct"], q["scores"])):
            short = cap if len(cap) <= 130 else cap[:127] + "..."
            ax.text(0.0, 1.0 - 0.2 * j, f"#{j + 1} {sc:.3f}  {'✔' if ok else '✘'}  {short}",
                    va="top", fontsize=9, color=GREEN if ok else "black",
                    fontweight="bold" if ok else "normal", transform=ax.transAxes)
        r += 1
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- HTML

def _png_b64(img: np.ndarray, size: int = 112) -> str:
    from PIL import Image

    im = Image.fromarray(np.asarray(img, dtype=np.uint8))
    im = im.resize((size, size), Image.NEAREST if im.width < size else Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(path: str | Path, metrics: dict, png_path: str | Path | None, examples: dict,
                history_note: str = "") -> None:
    e = html.escape
    header, rows = recall_rows(metrics)
    table = "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    table += "</table>"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mmpretrain retrieval report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:center}"
        ".q{display:flex;align-items:center;gap:10px;margin:10px 0}.cap{width:260px;font-style:italic}"
        ".hit{outline:5px solid " + GREEN + "}.miss{outline:1px solid " + RED + "}"
        ".img{text-align:center;font-size:11px}li.hit{outline:none;color:" + GREEN + ";font-weight:bold}"
        "table.examples td{text-align:left}.note{color:#666}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>",
        "<h1>mmpretrain retrieval report</h1>",
        f"<p>{e(_subtitle(metrics))}</p>",
        f"<p class='history'>{e(history_note)}</p>" if history_note else "",
        *(["<h2>Recall (%)</h2>", table,
           "<p>Ties count against the query: rank = number of wrong candidates scoring at least as high "
           "as the best right one. An image query is right if any of its captions is retrieved.</p>"] if rows else []),
        *_quality_html(metrics),
        *_zero_shot_html(metrics),
    ]
    if png_path is not None and Path(png_path).is_file():
        b64 = base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
        parts += ["<h2>Overview (report.png)</h2>",
                  f"<img alt='report' style='max-width:100%' src='data:image/png;base64,{b64}'>"]
    parts.append("<h2>Caption → top-5 images (contrastive ranking; right images framed green)</h2>")
    for q in examples.get("text_queries", []):
        parts.append(f"<div class='q text-query'><div class='cap'>“{e(q['caption'])}”</div>")
        for j, (img, ok, sc) in enumerate(zip(q["images"], q["correct"], q["scores"])):
            parts.append(f"<div class='img'><img class='{'hit' if ok else 'miss'}' "
                         f"src='data:image/png;base64,{_png_b64(img)}'><br>#{j + 1} {sc:.3f}</div>")
        parts.append("</div>")
    parts.append("<h2>Image → top-5 captions (contrastive ranking; right captions in green)</h2>")
    for q in examples.get("image_queries", []):
        items = "".join(f"<li class='{'hit' if ok else ''}'>{sc:.3f} {'✔' if ok else '✘'} {e(c)}</li>"
                        for c, ok, sc in zip(q["captions"], q["correct"], q["scores"]))
        parts.append(f"<div class='q image-query'><img src='data:image/png;base64,{_png_b64(q['image'])}'>"
                     f"<ol>{items}</ol></div>")
    parts += ["<h2>metrics.json</h2>", f"<pre>{e(json.dumps(metrics, indent=2))}</pre>", "</body></html>"]
    Path(path).write_text("".join(parts), encoding="utf-8")


def write_report(out_dir: str | Path, metrics: dict, history: list[dict], examples: dict,
                 history_source: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` then ``report.html`` (which embeds the PNG) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "zero_shot" not in metrics:
        zero_shot = read_zero_shot(out, metrics.get("step"))
        if zero_shot:
            metrics = {**metrics, "zero_shot": zero_shot}
    png, page = out / "report.png", out / "report.html"
    render_png(png, metrics, history, examples)
    steps = sum(1 for row in history if "loss" in row)
    note = (f"Training curves: {steps} logged steps from {history_source}." if history_source and steps
            else "Training curves: no metrics.jsonl found for this run.")
    render_html(page, metrics, png, examples, note)
    return png, page
