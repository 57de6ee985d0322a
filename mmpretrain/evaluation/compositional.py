"""Compositional test and ITM accuracy on mined hard negatives, on the held-out set.

**Compositional test** (our ARO / SugarCrepe). The synthetic generator stores each scene and
the plan of each caption in the sample json (``objects`` and ``caption_plan``, see
``mmpretrain.data.synthetic``). For every held-out image with a scene, captions are re-rendered
by the generator's own caption code with exactly one thing changed, so the text differs only
in the intended words (and an article "a"/"an" that must agree):

- ``color_swap``: two objects of different colours exchange their colour words;
- ``relation_flip``: the stated relation becomes its opposite (left<->right, above<->below);
  only captions that state a relation;
- ``shape_replace``: one object's shape word becomes a shape that is not in the scene;
- ``size_swap``: two objects of different size exchange their size words; only when the
  caption names both sizes.

A change is used only when the changed caption is *false* for the scene (checked by
``caption_holds``: e.g. swapping the colours of a red circle and a blue circle in "a red circle
and a blue circle" describes the same scene, so it is not used). Per image and kind the first
caption (key order) the kind applies to is used, and among its valid changes one is drawn with
a generator seeded by the sample key (deterministic, independent of the world size). Each
(image, true caption, changed caption) is one trial (a caption whose change lies past
``data.max_length`` tokens is passed over; ``dropped_truncated`` counts the (image, kind)
pairs left without a trial that way); the score of a trial is right when the
true caption scores above the changed one, a tie counts 0.5, chance is 0.5. Two scores:
contrastive cosine (``encode_text`` embeddings against the image embedding of the retrieval
evaluation) and ITM log-odds ``logit[1] - logit[0]`` of ``itm_logits(pixels, ids, mask)``.

**ITM on hard negatives.** For each held-out image its highest-cosine caption of another image,
and for each caption its highest-cosine other image (ties: lowest index), the distinct pairs
being the negatives; the positives are every caption with its own image. The ITM head is right
on a positive when ``logit[1] > logit[0]``, on a negative when ``logit[1] < logit[0]``; a tie
counts 0.5 (so a constant model scores 0.5 everywhere). ``balanced_acc`` is the mean of the
positive and the negative accuracy.

Public API. ``mmpretrain eval`` runs both inside ``run_evaluation``; ``mmpretrain bench
quality`` (or any caller with a model) can use the entry points in ``evaluate.py`` that embed
the held-out set first (that module imports this one, never the other way round)::

    from mmpretrain.evaluation.evaluate import embed_heldout, quality_metrics
    quality_metrics(model, cfg, tokenizer, *, accelerator=None, max_images=0, itm=None)
        -> {"compositional": <compositional_test dict>, "itm_hard_negatives": <dict>}
    embed_heldout(model, cfg, tokenizer, accelerator=None) -> HeldOut   # one embedding pass

    compositional_test(heldout, tokenizer, *, max_images=0, itm=None, known=None) -> dict
        {"num_images": int, "chance": 0.5, "ties": str, "itm": bool, "dropped_truncated": int,
         "kinds": {kind: {"n": int, "cosine_acc": float | None, "itm_acc": float | None}},
         "examples": {kind: {"caption": str, "changed": str}}, "seconds": float}
        or {"skipped": str} when no held-out sample has scene metadata.
    itm_hard_negatives(heldout, *, known=None, max_images=0) -> dict
        {"num_positives", "num_negatives", "positive_acc", "negative_acc", "balanced_acc",
         "seconds"} or {"skipped": str} (no trained ITM head, fewer than 2 images)

``model``: as ``run_evaluation`` gets it (DDP/DeepSpeed prepared or plain; used through
``forward(..., mode="features")`` for the image embeddings, the same as the retrieval
evaluation's, ``encode_text`` and ``itm_logits`` only); ``cfg``: the full config (``cfg.data``:
held-out shards, eval transform and tokenization exactly as the retrieval evaluation;
``cfg.eval.batch_size``); ``accelerator``: None for one process; ``tokenizer``: the run's.
``heldout`` (``evaluate.HeldOut``): the embedded held-out set with its model, config and
accelerator, and the model passes used here (``encode_texts``, ``itm_logodds``, ``itm_scores``,
``gather``). Every function must be called on every rank (model calls are padded to the same
number on every rank, as in ``evaluate.py``: ZeRO-3) and returns the same JSON-able dict on
every rank. ``max_images`` > 0 takes the first images in key order; ``itm=None`` means "when
the model has an ITM head trained with ``loss.itm_weight > 0``" (with ``itm=False`` the ITM
accuracies are None); ``known``: ITM log-odds already computed, ``{(image index, caption
index): score}`` over ``heldout.data`` (the same on every rank; ``run_evaluation`` passes the
re-ranking's), not computed again; ``itm_hard_negatives`` adds the pairs it scores to it, so a
following ``compositional_test(known=...)`` skips the true (image, caption) pairs.
Accuracies are fractions in [0, 1].

Distribution: the work is split by the rank holding each image's pixels (the owner in
``gather_samples``): no pixels cross ranks; the per-trial scores are merged with one gather.

Pure helpers: ``make_variants(meta, key) -> {kind: caption}``, ``caption_holds(plan, objects)``,
``pairwise_accuracy(true_scores, changed_scores)``, ``read_metadata(shards, keys)``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from itertools import combinations, product
from typing import Any, Callable, Sequence

import torch

from mmpretrain.data.synthetic import (
    COLORS,
    MAX_CAPTION_TOKENS,
    RELATIONS,
    SHAPES,
    SIZES,
    CaptionPlan,
    count_tokens,
    relation_holds,
    render_caption,
)

KINDS = ("color_swap", "relation_flip", "shape_replace", "size_swap")
CHANCE = 0.5
TIES = "a tie counts 0.5"
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


# ----------------------------------------------------------------------------- the scene

def has_scene(meta: dict | None) -> bool:
    """Whether a sample json carries what the compositional test needs."""
    return isinstance(meta, dict) and isinstance(meta.get("objects"), list) and \
        isinstance(meta.get("caption_plan"), dict)


def _fits(m, obj: dict, objects: list[dict]) -> bool:
    if m.color not in COLORS[obj["color"]][1] or m.shape not in SHAPES[obj["shape"]]:
        return False
    if m.size is not None and m.size not in SIZES[obj["size"]][1]:
        return False
    if m.position:  # the position phrase names the cell of the object first described
        ref = objects[m.object]
        if (obj["row"], obj["col"]) != (ref["row"], ref["col"]):
            return False
    return True


def caption_holds(plan: CaptionPlan, objects: list[dict]) -> bool:
    """Whether the caption of ``plan`` is true of the scene ``objects`` (the sample json's):
    some one-to-one assignment of its mentions to objects matches every named size, colour,
    shape and stated position, and the stated relation. The background phrase is not changed
    by any variant and is not checked."""
    fit = [[k for k, o in enumerate(objects) if _fits(m, o, objects)] for m in plan.mentions]
    if len(plan.mentions) > len(objects) or not all(fit):
        return False
    r = plan.relation
    for perm in product(*fit):
        if len(set(perm)) != len(perm):
            continue
        if r is None:
            return True
        a, b = objects[perm[r["subject"]]], objects[perm[r["object"]]]
        if relation_holds(r["relation"], a["row"], a["col"], b["row"], b["col"]):
            return True
    return False


def _copy(plan: CaptionPlan) -> CaptionPlan:
    return CaptionPlan(plan.template, [replace(m) for m in plan.mentions],
                       dict(plan.relation) if plan.relation else None)


# ----------------------------------------------------------------------------- the variants

def _color_swap(plan: CaptionPlan, objects: list[dict]) -> list[CaptionPlan]:
    out = []
    for i, j in combinations(range(len(plan.mentions)), 2):
        mi, mj = plan.mentions[i], plan.mentions[j]
        if objects[mi.object]["color"] == objects[mj.object]["color"]:
            continue
        new = _copy(plan)
        new.mentions[i].color, new.mentions[j].color = mj.color, mi.color
        out.append(new)
    return out


def _relation_flip(plan: CaptionPlan, objects: list[dict]) -> list[CaptionPlan]:
    r = plan.relation
    if not r or r.get("relation") not in OPPOSITE or r.get("words") not in RELATIONS[r["relation"]]:
        return []
    k = RELATIONS[r["relation"]].index(r["words"])
    target = OPPOSITE[r["relation"]]
    words = RELATIONS[target]
    new = _copy(plan)
    new.relation = {**r, "relation": target, "words": words[k] if k < len(words) else words[0]}
    return [new]


def _shape_replace(plan: CaptionPlan, objects: list[dict]) -> list[CaptionPlan]:
    absent = [s for s in SHAPES if s not in {o["shape"] for o in objects}]
    out = []
    for i in range(len(plan.mentions)):
        for shape in absent:
            for word in SHAPES[shape]:
                new = _copy(plan)
                new.mentions[i].shape = word
                out.append(new)
    return out


def _size_swap(plan: CaptionPlan, objects: list[dict]) -> list[CaptionPlan]:
    out = []
    for i, j in combinations(range(len(plan.mentions)), 2):
        mi, mj = plan.mentions[i], plan.mentions[j]
        if mi.size is None or mj.size is None or objects[mi.object]["size"] == objects[mj.object]["size"]:
            continue
        new = _copy(plan)
        new.mentions[i].size, new.mentions[j].size = mj.size, mi.size
        out.append(new)
    return out


_MAKERS: dict[str, Callable[[CaptionPlan, list[dict]], list[CaptionPlan]]] = {
    "color_swap": _color_swap, "relation_flip": _relation_flip,
    "shape_replace": _shape_replace, "size_swap": _size_swap,
}


def make_variants(meta: dict, key: str = "") -> dict[str, str]:
    """``{kind: changed caption}`` for the kinds that apply to this sample's caption.

    ``meta``: the sample json (``objects`` + ``caption_plan``); ``key`` seeds the choice among
    the valid changes. Only changes that make the caption false are offered, and none whose
    text would exceed the generator's token budget. Empty when the plan does not describe the
    scene (metadata that does not belong together)."""
    if not has_scene(meta):
        return {}
    plan = CaptionPlan.from_json(meta["caption_plan"])
    objects = meta["objects"]
    if not caption_holds(plan, objects):
        return {}
    original = render_caption(plan)
    out: dict[str, str] = {}
    for kind in KINDS:
        candidates = _MAKERS[kind](plan, objects)
        random.Random(f"mmpretrain-compositional/{key}/{kind}").shuffle(candidates)
        for new in candidates:  # the first valid one in a seeded order: a uniform choice
            text = render_caption(new)
            if text != original and count_tokens(text) <= MAX_CAPTION_TOKENS and not caption_holds(new, objects):
                out[kind] = text
                break
    return out


def pairwise_accuracy(true_scores: Sequence[float], changed_scores: Sequence[float]) -> float | None:
    """Share of trials where the true caption scores above the changed one; a tie counts 0.5.
    None for no trials."""
    if not len(true_scores):
        return None
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(true_scores, changed_scores))
    return wins / len(true_scores)


def read_metadata(shards, keys) -> dict[str, dict]:
    """The json of the samples with these keys in the held-out shards (``cfg.data.val_shards``:
    a pattern or a list). Samples without a readable json object are left out."""
    from mmpretrain.data.shardio import expand_sources, iter_shard_samples

    want = set(keys)
    out: dict[str, dict] = {}
    if not want:
        return out
    for url in expand_sources(shards):
        for _, sample in iter_shard_samples(url):
            key = sample.get("__key__")
            if key in want and key not in out and "json" in sample:
                try:
                    meta = json.loads(sample["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
                if isinstance(meta, dict):
                    out[key] = meta
        if len(out) == len(want):
            break
    return out


# ----------------------------------------------------------------------------- model side

def _images_in_order(data: dict, max_images: int) -> tuple[list[int], dict[int, list[int]]]:
    """Unique image indices (key order, capped) and each one's caption indices (key order)."""
    captions_of: dict[int, list[int]] = {}
    for t, u in enumerate(data["caption_image"].tolist()):
        captions_of.setdefault(int(u), []).append(t)
    images = list(range(len(data["image_ids"])))
    if max_images and max_images > 0:
        images = images[:int(max_images)]
    return images, captions_of


@torch.no_grad()
def compositional_test(heldout, tokenizer, *, max_images: int = 0, itm: bool | None = None,
                       known: dict | None = None) -> dict:
    """Per change kind: trials, and how often the true caption beats the changed one by
    cosine and by ITM (module docstring). Every rank calls this; same dict on every rank."""
    from mmpretrain.data.tokenizer import tokenize

    t0 = time.perf_counter()
    if itm is None:
        itm = heldout.itm_available
    cfg, data, rank = heldout.cfg, heldout.data, heldout.rank
    images, captions_of = _images_in_order(data, max_images)
    metas = read_metadata(cfg.data.val_shards, [data["keys"][t] for u in images for t in captions_of[u]])
    if not any(has_scene(m) for m in metas.values()):
        return {"skipped": "the held-out samples have no scene metadata (objects + caption_plan in "
                           "their json: synthetic shards); compositional test not run"}

    # candidates: (image, kind, true caption, changed caption), captions in key order; the same
    # list on every rank
    candidates: list[tuple[int, str, str, str]] = []
    caption_index: dict[tuple[int, str], int] = {}
    num_images = 0
    for u in images:
        scene = False
        for t in captions_of[u]:
            key = data["keys"][t]
            meta = metas.get(key)
            if not has_scene(meta):
                continue
            caption = data["captions"][t]
            if render_caption(CaptionPlan.from_json(meta["caption_plan"])) != caption:
                continue  # the plan is not this caption's (re-captioned shards): not usable
            scene = True
            caption_index[(u, caption)] = t
            candidates += [(u, kind, caption, changed) for kind, changed in make_variants(meta, key).items()]
        num_images += scene
    texts = sorted({c[2] for c in candidates} | {c[3] for c in candidates})
    index = {text: i for i, text in enumerate(texts)}
    tok = tokenize(tokenizer, texts if texts else [""], cfg.data.max_length)
    ids, mask = tok["input_ids"][:len(texts)], tok["attention_mask"][:len(texts)]
    # one trial per (image, kind): its first caption whose change the model can see (a change
    # past data.max_length tokens is cut off; when every caption's is, the pair is dropped)
    trials: list[tuple[int, str, str, str]] = []
    chosen: set[tuple[int, str]] = set()
    cut: set[tuple[int, str]] = set()
    for u, kind, caption, changed in candidates:
        if (u, kind) in chosen:
            continue
        if torch.equal(ids[index[caption]], ids[index[changed]]):
            cut.add((u, kind))
            continue
        chosen.add((u, kind))
        trials.append((u, kind, caption, changed))
    trials.sort(key=lambda tr: (tr[0], KINDS.index(tr[1])))

    # this rank's share: the trials of the images whose pixels it holds
    mine = [n for n, tr in enumerate(trials) if data["owner"][tr[0]] == rank]
    rows = sorted({index[trials[n][c]] for n in mine for c in (2, 3)})
    row_of = {t: r for r, t in enumerate(rows)}
    sel = torch.tensor(rows, dtype=torch.long)
    emb = heldout.encode_texts(ids[sel], mask[sel])
    image_emb = data["image_emb"].float()
    itm_of: dict[tuple[int, int], float] = {}
    if itm:
        for n in mine:  # true pairs scored before (the hard negatives' positives) are not again
            u, _, caption, _ = trials[n]
            if (u, caption_index[(u, caption)]) in (known or {}):
                itm_of[(u, index[caption])] = known[(u, caption_index[(u, caption)])]
        pairs = sorted({(trials[n][0], index[trials[n][c]]) for n in mine for c in (2, 3)} - set(itm_of))
        sel = torch.tensor([t for _, t in pairs], dtype=torch.long)
        px = [heldout.pixels[data["image_ids"][u]] for u, _ in pairs]
        itm_of.update(zip(pairs, heldout.itm_logodds(px, ids[sel], mask[sel])))
    records = []
    for n in mine:
        u, kind, caption, changed = trials[n]
        a, b = index[caption], index[changed]
        rec = [n, KINDS.index(kind), float(image_emb[u] @ emb[row_of[a]]), float(image_emb[u] @ emb[row_of[b]])]
        if itm:
            rec += [itm_of[(u, a)], itm_of[(u, b)]]
        records.append(rec)
    merged = sorted(r for part in heldout.gather(records) for r in part)

    kinds: dict[str, dict[str, Any]] = {}
    for k, kind in enumerate(KINDS):
        got = [r for r in merged if r[1] == k]
        kinds[kind] = {
            "n": len(got),
            "cosine_acc": pairwise_accuracy([r[2] for r in got], [r[3] for r in got]),
            "itm_acc": pairwise_accuracy([r[4] for r in got], [r[5] for r in got]) if itm else None,
        }
    examples: dict[str, dict] = {}
    for _, kind, caption, changed in trials:
        examples.setdefault(kind, {"caption": caption, "changed": changed})
    return {"num_images": num_images, "chance": CHANCE, "ties": TIES, "itm": bool(itm),
            "dropped_truncated": len(cut - chosen), "kinds": kinds,
            "examples": {k: examples[k] for k in KINDS if k in examples},
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def itm_hard_negatives(heldout, *, known: dict | None = None, max_images: int = 0) -> dict:
    """ITM accuracy on positives and on mined held-out hard negatives (module docstring).
    Every rank calls this; same dict on every rank."""
    t0 = time.perf_counter()
    if not heldout.itm_available:
        return {"skipped": "no trained ITM head (loss.itm_weight=0)"}
    data, rank = heldout.data, heldout.rank
    n_img, n_cap = len(data["image_ids"]), len(data["captions"])
    if n_img < 2:
        return {"skipped": "fewer than 2 held-out images: no negatives"}
    cap_img = data["caption_image"]
    scores = data["image_emb"].float() @ data["text_emb"].float().t()
    masked = scores.masked_fill(cap_img.unsqueeze(0) == torch.arange(n_img).unsqueeze(1), float("-inf"))
    hardest_caption = masked.argmax(dim=1).tolist()  # [U] first maximum: lowest index on ties
    hardest_image = masked.argmax(dim=0).tolist()  # [N]
    images, captions_of = _images_in_order(data, max_images)
    queries = [t for u in images for t in captions_of[u]]
    positives = [(int(cap_img[t]), t) for t in queries]
    negatives = sorted({(u, hardest_caption[u]) for u in images} | {(hardest_image[t], t) for t in queries})
    known = {} if known is None else known  # filled in place: the caller may reuse the scores
    todo = sorted({p for p in positives + negatives if p not in known and data["owner"][p[0]] == rank})
    known.update(heldout.itm_scores(todo))

    def acc(pairs, sign):
        return sum(1.0 if sign * known[p] > 0 else 0.5 if known[p] == 0 else 0.0 for p in pairs) / len(pairs)

    pos, neg = acc(positives, 1.0), acc(negatives, -1.0)
    return {"num_positives": len(positives), "num_negatives": len(negatives), "positive_acc": pos,
            "negative_acc": neg, "balanced_acc": (pos + neg) / 2, "seconds": time.perf_counter() - t0}
