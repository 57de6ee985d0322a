"""Zero-shot retrieval with ITM re-ranking, on every rank (or one CPU without a process group).

``run_evaluation(model, cfg, accelerator, tokenizer, step, out_dir) -> dict`` is what the
trainer calls every ``train.eval_every`` steps and at the end, and what ``mmpretrain eval``
calls on a checkpoint. Stages, each run by every rank:

1. embed: each rank reads its share of the held-out shards (``ShardLoader(train=False)``
   yields every sample once across ranks) and runs ``model(..., mode="features")``. Ranks that
   run out of batches early keep running the same forward on a dummy batch until every rank is
   done (one all-gather of a flag per batch): ZeRO-3 gathers parameters inside every forward,
   so every rank must make the same number of calls.
2. gather: embeddings, image ids, keys, captions and token ids of every sample reach every rank
   (``gather_object``; a few hundred bytes per sample). Samples are sorted by key so that the
   result does not depend on the world size; images are deduplicated by image id (first caption
   in key order gives the image embedding and decides which rank *owns* the image's pixels).
3. contrastive: cosine similarity image x caption, Recall@k both directions (``retrieval.py``).
4. ITM re-ranking: the top ``eval.itm_rerank_k`` candidates of every query are re-scored with
   the fused ITM head (score = log-odds ``logit[1] - logit[0]``, which does not saturate like the
   probability; with ``eval.itm_rerank_score: itm+itc``, the default, plus the contrastive logit
   ``logit_scale x cosine``, as BLIP adds the similarity). The work is split by the rank that holds each image's pixels: image->text
   queries on their image's owner, text->image candidates on the candidate image's owner, each
   (image, caption) pair scored once. So no pixels cross ranks — splitting text->image queries
   by query instead would need nearly every image on every rank. Scores are merged with one
   gather; ranks pad to the same number of ITM calls (ZeRO-3 again). Skipped when
   ``eval.itm_rerank_k`` is 0 or the model was trained with ``loss.itm_weight=0``.
5. compositional test and ITM accuracy on mined hard negatives (``evaluation/compositional.py``,
   ``eval.compositional`` / ``eval.itm_hard_negatives``), on the same embeddings and pixels,
   split by image owner like stage 4 (padded model calls, one gather of the per-trial scores);
   ITM scores already computed (re-ranking, then the hard negatives' positives) are reused. Nested under ``"compositional"`` and
   ``"itm_hard_negatives"`` in the metrics (their own timing is left out, so ``metrics.json``
   is the same for any world size apart from the ``*_seconds`` keys).
6. the main process writes ``metrics.json`` and the report; every rank returns the same dict.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpretrain.data.transforms import normalize
from mmpretrain.evaluation import compositional
from mmpretrain.evaluation import report as report_mod
from mmpretrain.evaluation.retrieval import (
    metrics_from_ranks,
    rerank_scores,
    retrieval_ranks,
    topk_candidates,
)


# ----------------------------------------------------------------------------- process helpers

def _world(accelerator) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return int(accelerator.process_index), int(accelerator.num_processes)


def _gather_objects(obj: Any, accelerator) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if accelerator is None or accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _unwrap(model, accelerator):
    return accelerator.unwrap_model(model) if accelerator is not None else model


def _model_dtype(core) -> torch.dtype:
    for p in core.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# ----------------------------------------------------------------------------- 1. embed

@torch.no_grad()
def _placement(core, accelerator):
    """``(device, weight dtype, autocast context)`` of the evaluation's model calls."""
    device = accelerator.device if accelerator is not None else next(core.parameters()).device
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    return device, _model_dtype(core), autocast


@torch.no_grad()  # embeddings only: no autograd graph (it also made rerank_scores warn on requires_grad)
def embed_shards(model, cfg, accelerator, tokenizer, keep_pixels: bool) -> dict:
    """This rank's samples: embeddings (fp32, CPU), ids, keys, captions, tokens, and the uint8
    pixels of the first sample of each local image id (only with ``keep_pixels``)."""
    from mmpretrain.data.loader import ShardLoader

    rank, world = _world(accelerator)
    core = _unwrap(model, accelerator)
    device, dtype, autocast = _placement(core, accelerator)
    cap = math.ceil(cfg.eval.max_samples / world) if cfg.eval.max_samples > 0 else 0

    loader = ShardLoader(cfg.data, tokenizer, rank=rank, world_size=world, seed=cfg.seed, train=False)
    out: dict[str, list] = {k: [] for k in ("image_emb", "text_emb", "image_ids", "keys", "captions",
                                            "input_ids", "attention_mask")}
    pixels: dict[int, torch.Tensor] = {}
    it = iter(loader)
    dummy = None
    seen = 0
    with autocast:
        while True:
            batch = None
            if not cap or seen < cap:
                batch = next(it, None)
            # Every rank runs the same number of forwards (ZeRO-3 gathers weights inside them).
            if world > 1:
                flags = _gather_objects(batch is not None, accelerator)
                if not any(flags):
                    break
            elif batch is None:
                break
            real = batch is not None
            if real:
                dummy = batch
            elif dummy is None:  # this rank got no data at all: a one-sample blank batch
                dummy = _blank_batch(cfg, tokenizer)
            b = batch if real else dummy
            pixels_in = normalize(b["pixels"].to(device), cfg.data.mean, cfg.data.std, dtype)
            feats = model(pixels_in, b["input_ids"].to(device), b["attention_mask"].to(device),
                          b["image_ids"].to(device), mode="features")
            if not real:
                continue
            n = len(b["keys"])
            if cap:
                n = min(n, cap - seen)
            seen += n
            out["image_emb"].append(feats["image_emb"][:n].float().cpu())
            out["text_emb"].append(feats["text_emb"][:n].float().cpu())
            out["image_ids"] += [int(x) for x in b["image_ids"][:n]]
            out["keys"] += list(b["keys"][:n])
            out["captions"] += list(b["captions"][:n])
            out["input_ids"].append(b["input_ids"][:n].cpu())
            out["attention_mask"].append(b["attention_mask"][:n].cpu())
            if keep_pixels:
                for j in range(n):
                    pixels.setdefault(int(b["image_ids"][j]), b["pixels"][j].cpu().clone())
    for k in ("image_emb", "text_emb", "input_ids", "attention_mask"):
        out[k] = torch.cat(out[k]) if out[k] else None
    out["pixels"] = pixels
    return out


def _blank_batch(cfg, tokenizer) -> dict:
    from mmpretrain.data.tokenizer import tokenize

    s = cfg.data.image_size
    tok = tokenize(tokenizer, [""], cfg.data.max_length)
    return {"pixels": torch.zeros(1, 3, s, s, dtype=torch.uint8), "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"], "image_ids": torch.zeros(1, dtype=torch.int64),
            "keys": [""], "captions": [""]}


# ----------------------------------------------------------------------------- 2. gather

def _duplicate_key_error(key: str, shards) -> ValueError:
    """A one-line error for a sample key read twice, naming the shards that hold it."""
    where = ""
    if shards:
        from mmpretrain.data.shardio import expand_sources, shards_with_key

        urls = expand_sources(shards)
        found = shards_with_key(urls, key, limit=2)
        if len(found) >= 2:
            where = f" (in {found[0]} and in {found[1]})"
        elif found and urls.count(found[0]) > 1:
            where = f" (in {found[0]}, which the shard pattern lists twice)"
        elif found:
            where = f" (in {found[0]} and in another shard)"
    return ValueError(f"sample key {key!r} occurs more than once in the held-out shards{where}; evaluation "
                      "needs keys that are unique across shards (re-key or drop the duplicates)")


def gather_samples(local: dict, accelerator, shards=None) -> dict:
    """Every rank's samples merged and sorted by key; images deduplicated by image id.

    Returns captions-level tensors (``text_emb``, ``input_ids``, ``attention_mask``,
    ``caption_image``: index of each caption's unique image), image-level ones (``image_emb``,
    ``image_ids``, ``owner``: the rank holding the pixels), ``keys`` and ``captions``.
    A key read twice (the same key in two shards) is a ``ValueError`` on every rank that names
    the key and, when ``shards`` (the held-out source) is given, the shards holding it.
    """
    mine = {k: v for k, v in local.items() if k != "pixels"}
    mine["pixel_ids"] = sorted(local["pixels"])
    parts = _gather_objects(mine, accelerator)
    rows = []  # (key, rank, local index)
    for r, p in enumerate(parts):
        rows += [(key, r, i) for i, key in enumerate(p["keys"])]
    if not rows:
        raise ValueError("evaluation found no usable sample in the held-out shards")
    rows.sort(key=lambda x: x[0])
    for (a, _, _), (b, _, _) in zip(rows, rows[1:]):
        if a == b:  # the loader reads each sample once, so the shards hold this key twice
            raise _duplicate_key_error(a, shards)

    def take(name):
        return torch.stack([parts[r][name][i] for _, r, i in rows])

    text_emb, input_ids, mask = take("text_emb"), take("input_ids"), take("attention_mask")
    all_image_emb = take("image_emb")
    image_ids_per_caption = [parts[r]["image_ids"][i] for _, r, i in rows]
    first: dict[int, int] = {}
    owner: list[int] = []
    for c, ((_, r, _), iid) in enumerate(zip(rows, image_ids_per_caption)):
        if iid not in first:
            first[iid] = c
            owner.append(r)
    unique_ids = list(first)
    index_of = {iid: u for u, iid in enumerate(unique_ids)}
    return {
        "keys": [k for k, _, _ in rows],
        "captions": [parts[r]["captions"][i] for _, r, i in rows],
        "text_emb": text_emb,
        "input_ids": input_ids,
        "attention_mask": mask,
        "caption_image": torch.tensor([index_of[i] for i in image_ids_per_caption], dtype=torch.long),
        "image_emb": all_image_emb[[first[i] for i in unique_ids]],
        "image_ids": unique_ids,
        "owner": owner,
    }


# ----------------------------------------------------------------------------- 4. ITM re-ranking

def _padded_calls(accelerator, n_items: int, batch_size: int) -> int:
    """The number of model calls every rank makes for ``n_items`` local items (the most any
    rank needs: under ZeRO-3 every rank must make the same calls)."""
    return max(_gather_objects(math.ceil(n_items / batch_size), accelerator))


@torch.no_grad()
def itm_logodds(model, cfg, accelerator, images: list[torch.Tensor], input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> list[float]:
    """ITM log-odds ``logit[1] - logit[0]`` of this rank's pairs ``(images[i], text i)``.

    ``images``: uint8 ``[3, H, W]`` pixels (as the eval loader yields them); ``input_ids`` /
    ``attention_mask``: ``[P, L]``. In chunks of ``eval.batch_size``; every rank calls this
    (with its own pairs, maybe none) and ranks pad to the same number of ``itm_logits`` calls.
    """
    core = _unwrap(model, accelerator)
    if getattr(getattr(core, "backbone", None), "towers", False):
        return _itm_logodds_towers(core, cfg, accelerator, images, input_ids, attention_mask)
    device, dtype, autocast = _placement(core, accelerator)
    bs = max(int(cfg.eval.batch_size), 1)
    out: list[float] = []
    with autocast:
        for c in range(_padded_calls(accelerator, len(images), bs)):
            lo, hi = c * bs, min((c + 1) * bs, len(images))
            real = hi > lo
            if real:
                px, ids, mask = torch.stack(images[lo:hi]), input_ids[lo:hi], attention_mask[lo:hi]
            else:  # padding call: same module calls as the other ranks, result dropped
                s = cfg.data.image_size
                px = torch.zeros(1, 3, s, s, dtype=torch.uint8)
                ids, mask = input_ids.new_zeros(1, input_ids.shape[1]), attention_mask.new_ones(1, input_ids.shape[1])
            logits = core.itm_logits(normalize(px.to(device), cfg.data.mean, cfg.data.std, dtype),
                                     ids.to(device), mask.to(device))
            if real:
                logits = logits.float().cpu()
                out += (logits[:, 1] - logits[:, 0]).tolist()
    return out


@torch.no_grad()
def _itm_logodds_towers(core, cfg, accelerator, images: list[torch.Tensor], input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> list[float]:
    """``itm_logodds`` for ``model.fusion_source: towers``: the fused pass starts from the
    unimodal tokens, so each distinct image (by tensor identity) and caption (by token row)
    takes its unimodal pass once, and only the fusion blocks run per pair — the same numbers
    as ``itm_logits`` pair by pair (tested), a fraction of the cost when every query has k
    candidates. Three padded stages (image passes, caption passes, fused passes): every rank
    makes the same calls of each (ZeRO-3)."""
    bb = core.backbone
    device, dtype, autocast = _placement(core, accelerator)
    bs = max(int(cfg.eval.batch_size), 1)
    img_slot: dict[int, int] = {}
    uniq_images: list[torch.Tensor] = []
    for im in images:
        if id(im) not in img_slot:
            img_slot[id(im)] = len(uniq_images)
            uniq_images.append(im)
    rows = [tuple(r) for r in torch.cat([input_ids, attention_mask.to(input_ids.dtype)], 1).tolist()]
    txt_slot: dict[tuple, int] = {}
    for r in rows:
        txt_slot.setdefault(r, len(txt_slot))
    n_txt = input_ids.shape[1]
    uniq_rows = torch.tensor(list(txt_slot), dtype=input_ids.dtype) if txt_slot else \
        input_ids.new_zeros(0, 2 * n_txt)
    s = cfg.data.image_size
    img_tok, txt_tok = [], []
    with autocast:
        for c in range(_padded_calls(accelerator, len(uniq_images), bs)):
            chunk = uniq_images[c * bs:(c + 1) * bs]
            px = torch.stack(chunk) if chunk else torch.zeros(1, 3, s, s, dtype=torch.uint8)
            tok = bb.image_inputs(normalize(px.to(device), cfg.data.mean, cfg.data.std, dtype))
            if chunk:
                img_tok.append(tok)
        for c in range(_padded_calls(accelerator, len(uniq_rows), bs)):
            chunk = uniq_rows[c * bs:(c + 1) * bs]
            real = len(chunk) > 0
            if not real:
                chunk = torch.cat([input_ids.new_zeros(1, n_txt), input_ids.new_ones(1, n_txt)], 1)
            ids, mask = chunk[:, :n_txt].to(device), chunk[:, n_txt:].to(attention_mask.dtype).to(device)
            tok = bb.text_inputs(ids, mask)
            if real:
                txt_tok.append((tok, mask))
        out: list[float] = []
        pi = torch.tensor([img_slot[id(im)] for im in images], dtype=torch.long)
        ti = torch.tensor([txt_slot[r] for r in rows], dtype=torch.long)
        all_img = torch.cat(img_tok) if img_tok else None
        all_txt = torch.cat([t for t, _ in txt_tok]) if txt_tok else None
        all_mask = torch.cat([m for _, m in txt_tok]) if txt_tok else None
        for c in range(_padded_calls(accelerator, len(images), bs)):
            lo, hi = c * bs, min((c + 1) * bs, len(images))
            if hi > lo:
                a, t = pi[lo:hi].to(device), ti[lo:hi].to(device)
                logits = core.itm_from_inputs(all_img[a], all_txt[t], all_mask[t])
            else:  # padding call: the fusion blocks over one dummy pair
                n_img = bb.image_embed.num_tokens
                logits = core.itm_from_inputs(torch.zeros(1, n_img, bb.cfg.width, device=device, dtype=dtype),
                                              torch.zeros(1, n_txt, bb.cfg.width, device=device, dtype=dtype),
                                              torch.ones(1, n_txt, dtype=attention_mask.dtype, device=device))
            if hi > lo:
                logits = logits.cpu()
                out += (logits[:, 1] - logits[:, 0]).tolist()
    return out


@torch.no_grad()
def encode_texts(model, cfg, accelerator, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised fp32 CPU text embeddings ``[P, E]`` (``encode_text``) of this rank's
    tokens, in chunks of ``eval.batch_size``; every rank calls this, padded as ``itm_logodds``."""
    core = _unwrap(model, accelerator)
    device, _, autocast = _placement(core, accelerator)
    bs = max(int(cfg.eval.batch_size), 1)
    n = int(input_ids.shape[0])
    out = []
    with autocast:
        for c in range(_padded_calls(accelerator, n, bs)):
            lo, hi = c * bs, min((c + 1) * bs, n)
            if hi > lo:
                ids, mask = input_ids[lo:hi], attention_mask[lo:hi]
            else:
                ids, mask = input_ids.new_zeros(1, input_ids.shape[1]), attention_mask.new_ones(1, input_ids.shape[1])
            emb = core.encode_text(ids.to(device), mask.to(device))[1]
            if hi > lo:
                out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def itm_scores(model, cfg, accelerator, data: dict, pixels: dict[int, torch.Tensor],
               pairs: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """ITM log-odds of (unique image, caption) pairs whose image this rank owns; merged over
    ranks. ``pairs`` is this rank's list; every rank calls this (collectives inside)."""
    t = torch.tensor([t for _, t in pairs], dtype=torch.long)
    local_scores = itm_logodds(model, cfg, accelerator, [pixels[data["image_ids"][i]] for i, _ in pairs],
                               data["input_ids"][t], data["attention_mask"][t])
    merged: dict[tuple[int, int], float] = {}
    for part in _gather_objects(list(zip(pairs, local_scores)), accelerator):
        for pair, score in part:
            merged[tuple(pair)] = score
    return merged


def _logit_scale(core) -> float:
    """The model's contrastive logit scale (every rank calls it: ZeRO-3 gathers in forward);
    0 for a model without one."""
    ls = getattr(core, "logit_scale", None)
    if ls is None:
        return 0.0
    with torch.no_grad():
        return float(ls().float().reshape(-1)[0])


def itm_rerank(model, cfg, accelerator, data: dict, pixels: dict, scores: torch.Tensor, k: int,
               contrastive_scale: float = 0.0):
    """Re-ranked score matrices (image x caption for i2t, caption x image for t2i) and the ITM
    log-odds of every pair scored, ``{(unique image, caption): score}`` (the same on every rank).
    A candidate's new score is its ITM log-odds plus ``contrastive_scale`` x its cosine
    (``eval.itm_rerank_score: itm+itc`` passes the model's logit scale; 'itm' passes 0)."""
    rank, _ = _world(accelerator)
    cand_i2t = topk_candidates(scores, k)  # [U, k] caption indices
    cand_t2i = topk_candidates(scores.t(), k)  # [N, k] image indices
    owner = data["owner"]
    pairs: set[tuple[int, int]] = set()
    for i in range(scores.shape[0]):
        if owner[i] == rank:
            pairs.update((i, int(t)) for t in cand_i2t[i])
    for t in range(scores.shape[1]):
        pairs.update((int(i), t) for i in cand_t2i[t] if owner[int(i)] == rank)
    merged = itm_scores(model, cfg, accelerator, data, pixels, sorted(pairs))
    new_i2t = torch.tensor([[merged[(i, int(t))] for t in cand_i2t[i]] for i in range(scores.shape[0])],
                           dtype=torch.float64)
    new_t2i = torch.tensor([[merged[(int(i), t)] for i in cand_t2i[t]] for t in range(scores.shape[1])],
                           dtype=torch.float64)
    if contrastive_scale:
        cos = scores.double()
        new_i2t = new_i2t + contrastive_scale * cos.gather(1, cand_i2t.long())
        new_t2i = new_t2i + contrastive_scale * cos.t().gather(1, cand_t2i.long())
    return rerank_scores(scores, cand_i2t, new_i2t), rerank_scores(scores.t(), cand_t2i, new_t2i), merged


# ----------------------------------------------------------------------------- held-out session

@dataclass
class HeldOut:
    """The held-out set embedded by ``model`` (``data`` as ``gather_samples`` returns it, the
    same on every rank; ``pixels``: this rank's uint8 pixels by image id) and the model passes
    on it that the compositional test and the ITM hard negatives use
    (``evaluation/compositional.py`` takes one of these and imports nothing from here). Every
    method that runs the model or a collective must be called on every rank."""
    model: Any
    cfg: Any
    accelerator: Any
    data: dict
    pixels: dict

    @property
    def rank(self) -> int:
        return _world(self.accelerator)[0]

    @property
    def itm_available(self) -> bool:
        """An ITM head that was trained (``loss.itm_weight > 0``)."""
        return float(self.cfg.loss.itm_weight) > 0 and hasattr(_unwrap(self.model, self.accelerator), "itm_logits")

    def gather(self, obj: Any) -> list[Any]:
        return _gather_objects(obj, self.accelerator)

    def itm_scores(self, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
        return itm_scores(self.model, self.cfg, self.accelerator, self.data, self.pixels, pairs)

    def itm_logodds(self, images: list[torch.Tensor], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> list[float]:
        return itm_logodds(self.model, self.cfg, self.accelerator, images, input_ids, attention_mask)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return encode_texts(self.model, self.cfg, self.accelerator, input_ids, attention_mask)


def embed_heldout(model, cfg, tokenizer, accelerator=None) -> HeldOut:
    """Embed ``cfg.data.val_shards`` as ``run_evaluation`` does (same loader, eval transform,
    tokenization, ``eval.max_samples``), keeping the pixels of the images this rank owns."""
    was_training = model.training
    model.eval()
    try:
        local = embed_shards(model, cfg, accelerator, tokenizer, keep_pixels=True)
        data = gather_samples(local, accelerator, shards=cfg.data.val_shards)
    finally:
        if was_training:
            model.train()
    return HeldOut(model, cfg, accelerator, data, local["pixels"])


def quality_metrics(model, cfg, tokenizer, *, accelerator=None, max_images: int = 0,
                    itm: bool | None = None) -> dict:
    """The compositional test and the ITM accuracy on hard negatives on one embedding pass of
    ``cfg.data.val_shards``: ``{"compositional": dict, "itm_hard_negatives": dict}`` (each as
    documented in ``evaluation/compositional.py``, with its ``seconds``). Every rank calls it."""
    heldout = embed_heldout(model, cfg, tokenizer, accelerator)
    was_training = model.training
    model.eval()
    known: dict = {}
    try:
        hard = compositional.itm_hard_negatives(heldout, known=known, max_images=max_images) \
            if itm is not False else {"skipped": "ITM disabled (itm=False)"}
        comp = compositional.compositional_test(heldout, tokenizer, max_images=max_images, itm=itm, known=known)
    finally:
        if was_training:
            model.train()
    return {"compositional": comp, "itm_hard_negatives": hard}


# ----------------------------------------------------------------------------- 5. examples

def pick_examples(data: dict, i2t_scores: torch.Tensor, t2i_scores: torch.Tensor, num: int,
                  pixels: dict, accelerator, top: int = 5, itm_i2t: torch.Tensor | None = None,
                  itm_t2i: torch.Tensor | None = None, itm_logodds: dict | None = None,
                  itm_scale: float = 0.0) -> dict:
    """Report examples: ``num`` caption queries and ``num`` image queries spread evenly over the
    key-sorted set, with their top-``top`` results, the ITM re-ranked top ``top`` (``itm_i2t`` /
    ``itm_t2i``: the re-ranked score matrices; shown with the score that ordered them,
    ``itm_logodds[(image, caption)] + itm_scale x cosine``) and the 1-based position of the right
    answer (its image when outside the top). The few
    images shown are fetched from their owners with one gather (every rank calls this)."""
    rank, _ = _world(accelerator)
    n_img, n_cap = i2t_scores.shape
    cap_q = sorted({int(x) for x in np.linspace(0, n_cap - 1, num).round()}) if num and n_cap else []
    img_q = sorted({int(x) for x in np.linspace(0, n_img - 1, num).round()}) if num and n_img else []
    cap_img = data["caption_image"]

    def order(scores):
        return None if scores is None else torch.sort(scores, dim=1, descending=True, stable=True)

    order_t2i, order_i2t = order(t2i_scores), order(i2t_scores)
    itm_t2i_o, itm_i2t_o = order(itm_t2i), order(itm_i2t)

    def position(o, q: int, right) -> int | None:  # 1-based position of the first right candidate
        if o is None:
            return None
        hits = right(o.indices[q]).nonzero()
        return int(hits[0]) + 1 if len(hits) else None

    needed = set(img_q)
    for t in cap_q:
        needed.update(int(i) for i in order_t2i.indices[t, :top])
        if itm_t2i_o is not None:
            needed.update(int(i) for i in itm_t2i_o.indices[t, :top])
        needed.add(int(cap_img[t]))
    iids = data["image_ids"]
    mine = {u: pixels[iids[u]].permute(1, 2, 0).numpy() for u in needed if data["owner"][u] == rank}
    images: dict[int, np.ndarray] = {}
    for part in _gather_objects(mine, accelerator):
        images.update(part)
    known = itm_logodds or {}

    def itm_score(i: int, t: int) -> float | None:
        return known[(i, t)] + itm_scale * float(i2t_scores[i, t]) if (i, t) in known else None

    text_queries = []
    for t in cap_q:
        gt = int(cap_img[t])
        q = {"caption": data["captions"][t],
             "images": [images[int(i)] for i in order_t2i.indices[t, :top]],
             "correct": [int(i) == gt for i in order_t2i.indices[t, :top]],
             "scores": [float(s) for s in order_t2i.values[t, :top]],
             "truth": {"rank": position(order_t2i, t, lambda ix: ix == gt),
                       "itm_rank": position(itm_t2i_o, t, lambda ix: ix == gt), "image": images[gt]}}
        if itm_t2i_o is not None:
            idx = [int(i) for i in itm_t2i_o.indices[t, :top]]
            q["itm"] = {"images": [images[i] for i in idx], "correct": [i == gt for i in idx],
                        "scores": [itm_score(i, t) for i in idx]}
        text_queries.append(q)
    image_queries = []
    for u in img_q:
        mine_caps = cap_img == u
        first = position(order_i2t, u, lambda ix: mine_caps[ix])
        q = {"image": images[u],
             "captions": [data["captions"][int(t)] for t in order_i2t.indices[u, :top]],
             "correct": [int(cap_img[int(t)]) == u for t in order_i2t.indices[u, :top]],
             "scores": [float(s) for s in order_i2t.values[u, :top]],
             "truth": {"rank": first, "itm_rank": position(itm_i2t_o, u, lambda ix: mine_caps[ix]),
                       "caption": data["captions"][int(order_i2t.indices[u, first - 1])]}}
        if itm_i2t_o is not None:
            idx = [int(t) for t in itm_i2t_o.indices[u, :top]]
            q["itm"] = {"captions": [data["captions"][t] for t in idx], "correct": [int(cap_img[t]) == u for t in idx],
                        "scores": [itm_score(u, t) for t in idx]}
        image_queries.append(q)
    return {"text_queries": text_queries, "image_queries": image_queries}


# ----------------------------------------------------------------------------- entry point

def find_history(cfg, out_dir: Path, checkpoint: str | Path | None = None) -> Path | None:
    """The run's ``metrics.jsonl``: above the checkpoint, in ``train.output_dir``, or above the
    output directory (``RUN/eval/step_N``)."""
    candidates = []
    if checkpoint:  # RUN/checkpoints/step_N -> RUN/metrics.jsonl
        candidates += [p / "metrics.jsonl" for p in list(Path(checkpoint).resolve().parents)[:2]]
    candidates.append(Path(cfg.train.output_dir) / "metrics.jsonl")
    candidates += [p / "metrics.jsonl" for p in list(Path(out_dir).resolve().parents)[:2]]
    return next((p for p in candidates if p.is_file()), None)


def run_evaluation(model, cfg, accelerator, tokenizer, step: int, out_dir: str | Path,
                   checkpoint: str | Path | None = None) -> dict:
    """Evaluate ``model`` on ``cfg.data.val_shards``; every rank returns the same metrics dict.

    ``cfg`` is the full config (``data`` for the loader, ``eval`` for the protocol,
    ``train.output_dir`` to find the run's ``metrics.jsonl``). Writes ``metrics.json`` (and the
    report when ``eval.report``) into ``out_dir`` from the main process.
    """
    rank, world = _world(accelerator)
    ks = sorted(int(k) for k in cfg.eval.ks)
    rerank_k = int(cfg.eval.itm_rerank_k)
    core = _unwrap(model, accelerator)
    # an ITM head trained with itm_weight 0 is random: re-ranking with it would only add noise
    itm_ok = cfg.loss.itm_weight > 0 and hasattr(core, "itm_logits")
    do_itm = rerank_k > 0 and itm_ok
    do_comp, do_hard = bool(cfg.eval.compositional), bool(cfg.eval.itm_hard_negatives)
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        local = embed_shards(model, cfg, accelerator, tokenizer,
                             keep_pixels=do_itm or (cfg.eval.report and cfg.eval.num_examples > 0)
                             or (itm_ok and (do_comp or do_hard)))
        data = gather_samples(local, accelerator, shards=cfg.data.val_shards)
        scores = data["image_emb"] @ data["text_emb"].t()  # [U, N] cosine (embeddings are L2-normalised)
        i2t, t2i = retrieval_ranks(scores, data["caption_image"])
        metrics: dict[str, Any] = {"step": int(step)}
        metrics.update(metrics_from_ranks(i2t, t2i, ks))
        metrics["contrastive_seconds"] = time.perf_counter() - t0
        show_i2t, show_t2i = scores, scores.t()
        itm_known: dict = {}
        if do_itm:
            t1 = time.perf_counter()
            mode = cfg.eval.itm_rerank_score  # checked by EvalConfig
            if mode == "itm+itc" and getattr(core.model_cfg, "itm_contrastive_prior", False):
                # the ITM logit already holds the contrastive evidence: adding it again would
                # weigh it twice
                warnings.warn("eval.itm_rerank_score=itm+itc with model.itm_contrastive_prior: re-ranking by "
                              "'itm' (the prior already adds the contrastive logit)", stacklevel=2)
                mode = "itm"
            scale = _logit_scale(core) if mode == "itm+itc" else 0.0
            re_i2t, re_t2i, itm_known = itm_rerank(model, cfg, accelerator, data, local["pixels"], scores, rerank_k,
                                                   contrastive_scale=scale)
            r_i2t = retrieval_ranks(re_i2t, data["caption_image"])[0]
            r_t2i = retrieval_ranks(re_t2i.t(), data["caption_image"])[1]
            for key, value in metrics_from_ranks(r_i2t, r_t2i, ks).items():
                if key not in ("num_images", "num_captions"):
                    metrics[f"itm_{key}"] = value
            metrics["itm_rerank_k"] = rerank_k
            metrics["itm_rerank_score"] = mode
            metrics["itm_seconds"] = time.perf_counter() - t1
        # Compositional test and ITM on hard negatives: nested dicts; their "seconds" are left
        # out of metrics.json so that it stays identical across world sizes (timing keys aside).
        if do_comp or do_hard:
            heldout = HeldOut(model, cfg, accelerator, data, local["pixels"])
            if do_hard:  # first: its positives are the compositional test's true pairs (scored once)
                hard = compositional.itm_hard_negatives(heldout, known=itm_known)
                hard.pop("seconds", None)
            if do_comp:
                result = compositional.compositional_test(heldout, tokenizer, itm=itm_ok, known=itm_known,
                                                          max_images=int(cfg.eval.compositional_max_images))
                result.pop("seconds", None)
                metrics["compositional"] = result
            if do_hard:
                metrics["itm_hard_negatives"] = hard
        metrics["world_size"] = world
        examples = None
        if cfg.eval.report and cfg.eval.num_examples > 0:
            examples = pick_examples(data, show_i2t, show_t2i, int(cfg.eval.num_examples),
                                     local["pixels"], accelerator, itm_i2t=re_i2t if do_itm else None,
                                     itm_t2i=re_t2i if do_itm else None, itm_logodds=itm_known,
                                     itm_scale=scale if do_itm else 0.0)
        if rank == 0:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            if cfg.eval.report:
                source = find_history(cfg, out, checkpoint)
                report_mod.write_report(out, metrics, report_mod.read_history(source), examples or {}, source,
                                        checkpoint=checkpoint, shards=cfg.data.val_shards)
    finally:
        if was_training:
            model.train()
    return metrics
