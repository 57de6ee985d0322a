"""Losses: InfoNCE with an autograd all-gather, ITM with global hard negatives, triplet.

Public API (plain tensors, inside or outside a process group; without one every gather is the
identity and no process-group call is made):

- ``info_nce(image_emb, text_emb, logit_scale, gather=True, cache=None)``
- ``triplet_loss(image_emb, text_emb, margin=0.2, gather=True, hardest=True, image_ids=None)``
- ``sample_itm_negatives(sim_i2t, sim_t2i, image_ids_local, image_ids_global, generator, floor)``
- ``itm_labels(...)``, ``itm_loss(logits, labels)``, ``itm_uniform_share(step, ...)`` (the
  hardness curriculum), ``select_hardest(hardness, fraction)`` (score a share of the batch)
- ``mlm_mask(input_ids, attention_mask, generator, ...)``, ``mlm_loss(logits, labels)``
- ``combined(parts, loss_cfg)`` -> ``{"loss": weighted total, each part detached}``
- ``FeatureCache`` (gradient accumulation with a contrastive batch as large as the accumulated
  batch)

What is exact
-------------
World W, B rows per rank, N = W * B. One process holding the whole batch computes

    L = 1/2 * [ 1/N sum_i CE(s * x_i . T^T, i) + 1/N sum_i CE(s * t_i . X^T, i) ]

Rank r gathers X and T *with autograd* (``distributed.all_gather_with_grad``: backward sums the
gradient over ranks and keeps the local slice), computes its local rows against all N columns
with labels ``r * B + arange(B)`` and takes the mean over its B rows: ``L_r``, with
``L = mean_r L_r``. Rank r's embedding gradient is ``sum_q dL_q / dx_r`` (every rank's loss
reaches rank r's rows through the gather's backward), so DDP's averaging ``1/W sum_r`` gives
exactly ``dL/dtheta``; the logit scale, read by every rank, averages the same way. The
*reported* value is made equal to ``L`` without touching the gradient:
``L_r + (mean_r L_r - L_r.detach())`` (one scalar all-reduce).
Two tempting variants are wrong (tests implement both and show the difference): a no-grad
gather with the local slice put back gives ``dL_r/dx_r`` only — gradient scaled by 1/W for the
column terms; a no-grad gather with only the local rows carrying gradient through the columns
is biased.

ITM (``sample_itm_negatives``): from detached similarities of local rows x global columns,
every candidate with the same image id as the row (this includes the positive) is masked; the
weights are ``softmax(sim over valid candidates) + floor`` on valid candidates, 0 elsewhere.
Sampling is inverse-CDF with uniforms drawn for *all N global rows* from a generator in the
same state on every rank; rank r uses rows ``r*B .. r*B+B-1``. The choice therefore depends only
on the global similarity and the seed: one process holding the global batch picks the same
negatives. Fallbacks: a row without valid mass (all candidates share its image id, or the
softmax is not finite) samples uniformly among all other columns; with N = 1 it takes the
positive itself. A "negative" that shares the image id is then labelled 1 (matching): labels
always come from image-id equality, never from the role the pair was sampled for.
Curriculum (``uniform_mix``): the weights are ``(1 - a) * softmax + a * uniform`` over the valid
candidates before the floor, with ``a`` a function of the model's forward counter only
(``itm_uniform_share``), so it is the same on every rank and after a resume.
The chosen rows (ids/masks, pixels) are fetched without gradient (``distributed.fetch_rows``:
indices first, then an all-to-all of the chosen rows, O(B) per rank) and the fused pass runs
locally on B positive + 2B negative pairs; the loss is a 2-way cross-entropy averaged over the
3B pairs (same scaling argument: DDP averaging gives the single-process gradient exactly).

Losses averaged over a variable number of items (ITM with ``itm_fraction < 1``, MLM over the
masked tokens): rank r holds ``n_r`` items with loss sum ``S_r``; the single-process loss is
``sum_r S_r / sum_r n_r``. Rank r computes ``S_r / mean_q n_q`` (one scalar all-reduce of the
count, no gradient): the mean over ranks of that is exactly the global mean, and so is DDP's
gradient average. Which items are chosen depends only on global quantities (the seeded
generator drawn for all N rows, gathered hardness scores), never on the partition.

Gradient accumulation with a feature cache (GradCache / open_clip accum-freq)
----------------------------------------------------------------------------
The accumulated batch is M micro-batches of b rows per rank; A = M * b rows per rank, W * A
in all. First a no-grad pass (``mode="features"``) over every micro-batch fills the cache
(``FeatureCache.from_local`` gathers it: rank-major, rank r's block is rows ``[r*A, (r+1)*A)``,
micro-batch m at ``r*A + m*b``). Then each micro-batch runs a grad pass; ``info_nce`` puts the
fresh embeddings of *every rank's* micro-batch m (autograd gather) into their slots and computes
this rank's A accumulated rows against all W*A columns. Each micro-step thus gives the exact
gradient of the full accumulated loss with respect to micro-batch m's embeddings. The logit
scale would be counted M times, so its gradient inside the surrogate is scaled by 1/M and the
surrogate is multiplied by M; the trainer then treats it like any accumulated loss (divides by
M before backward, as Accelerate does) and the summed gradient is that of the full accumulated
batch. The returned *value* is the full accumulated batch's InfoNCE. Cost: one extra forward
per micro-batch (the feature pass) and A x W*A logits per micro-step. Requires a deterministic
forward (dropout 0) so cached and fresh embeddings agree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mmpretrain import distributed as D

__all__ = [
    "FeatureCache", "info_nce", "triplet_loss", "ItmNegatives", "sample_itm_negatives",
    "itm_labels", "itm_loss", "combined", "report_global", "global_item_mean", "itm_uniform_share",
    "select_hardest", "mlm_mask", "mlm_loss",
]


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (half types are upcast; float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def report_global(local_loss: torch.Tensor) -> torch.Tensor:
    """Same gradient as ``local_loss``; value replaced by its mean over ranks."""
    return local_loss + (D.global_mean(local_loss) - local_loss.detach())


# ----------------------------------------------------------------------------- feature cache

@dataclasses.dataclass
class FeatureCache:
    """Detached embeddings of the whole accumulated global batch and this micro-batch's slot.

    ``image_emb``/``text_emb``: [W * A, E], rank-major (rank r's block ``[r*A, (r+1)*A)``).
    ``offset``: first row of this micro-batch inside this rank's block. ``num_micro``: M.
    ``world_size``: how many ranks' blocks the cache holds (1 for a cache built without
    gathering: then it is this rank's block alone).
    """

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    offset: int = 0
    num_micro: int = 1
    world_size: int = 1

    @classmethod
    def from_local(cls, image_embs: Sequence[torch.Tensor] | torch.Tensor,
                   text_embs: Sequence[torch.Tensor] | torch.Tensor, gather: bool = True) -> "FeatureCache":
        """Build from this rank's per-micro-batch feature outputs (gathers across ranks)."""
        m = len(image_embs) if isinstance(image_embs, (list, tuple)) else 1
        img = torch.cat(list(image_embs)) if isinstance(image_embs, (list, tuple)) else image_embs
        txt = torch.cat(list(text_embs)) if isinstance(text_embs, (list, tuple)) else text_embs
        world = 1
        if gather:
            img, txt = D.all_gather_no_grad(img), D.all_gather_no_grad(txt)
            world = D.get_world_size()
        return cls(img.detach(), txt.detach(), 0, m, world)

    def at(self, micro_index: int, micro_batch: int) -> "FeatureCache":
        """The same cache pointing at micro-batch ``micro_index`` of size ``micro_batch``."""
        return dataclasses.replace(self, offset=micro_index * micro_batch)


def _scale(logit_scale) -> torch.Tensor:
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale))
    return _f32(logit_scale).reshape(())


def _with_scale(image, text, logit_scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image, text, scale)``: the inputs at least fp32 and in the scale's dtype when it differs
    (a float64 scale makes the whole loss float64), the scale on their device."""
    image, text = _f32(image), _f32(text)
    scale = _scale(logit_scale).to(image.device)
    if scale.dtype != image.dtype:
        image, text = image.to(scale.dtype), text.to(scale.dtype)
    return image, text, scale


def _gather_pair(image_emb, text_emb, gather):
    if gather:
        return D.all_gather_with_grad(image_emb), D.all_gather_with_grad(text_emb), D.get_rank() * image_emb.shape[0]
    return image_emb, text_emb, 0


def _symmetric_ce(img_rows, txt_rows, img_cols, txt_cols, scale, labels, extra_i2t=None):
    logits_i2t = scale * img_rows @ txt_cols.t()
    if extra_i2t is not None:  # one more (own) negative column per image row; -inf: none
        extra = _f32(extra_i2t).to(logits_i2t.dtype)
        has = torch.isfinite(extra)  # -inf stays out of the product: no 0 * inf in the scale's gradient
        col = torch.where(has, scale * torch.where(has, extra, torch.zeros_like(extra)),
                          torch.full_like(extra, float("-inf")))
        logits_i2t = torch.cat([logits_i2t, col.unsqueeze(1)], dim=1)
    logits_t2i = scale * txt_rows @ img_cols.t()
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale, gather: bool = True,
             cache: FeatureCache | None = None, gathered: tuple | None = None,
             extra_i2t: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised embeddings ([B, E] each), computed in fp32.

    ``logit_scale``: the multiplicative scale (already ``exp``-ed and clamped), tensor or float.
    ``gather``: contrast against every rank's batch (autograd all-gather). ``cache``: see
    ``FeatureCache``. ``gathered``: optional ``(image_all, text_all, row_offset)`` already
    gathered with autograd (lets the model reuse one gather for ITM mining). ``extra_i2t``: [B]
    cosines of each image with one more negative caption of its own (NegCLIP-style word-changed
    captions), ``-inf`` where a row has none; it joins that row's image-to-text softmax only.
    Returns a scalar whose value is the global loss and whose gradient, after DDP averaging,
    is the single-process gradient (module docstring).
    """
    image_emb, text_emb, scale = _with_scale(image_emb, text_emb, logit_scale)
    if cache is None:
        if gathered is not None:
            img_all, txt_all, off = gathered
            img_all, txt_all = _f32(img_all), _f32(txt_all)
        else:
            img_all, txt_all, off = _gather_pair(image_emb, text_emb, gather)
        labels = off + torch.arange(image_emb.shape[0], device=image_emb.device)
        return report_global(_symmetric_ce(image_emb, text_emb, img_all, txt_all, scale, labels, extra_i2t))
    if extra_i2t is not None:
        raise ValueError("loss.itc_word_negatives does not combine with the feature cache (train.grad_accum_steps > 1 "
                         "with train.feature_cache=true); set one of them off")

    # ---- feature cache: all of this rank's accumulated rows vs every accumulated column
    world = D.get_world_size() if gather else 1
    rank = D.get_rank() if gather else 0
    cache_img = cache.image_emb.detach().to(image_emb.dtype)
    cache_txt = cache.text_emb.detach().to(image_emb.dtype)
    if not gather and cache.world_size > 1:  # a gathered cache, used without gathering: own block
        a = cache_img.shape[0] // cache.world_size
        r0 = D.get_rank() * a
        cache_img, cache_txt = cache_img[r0:r0 + a], cache_txt[r0:r0 + a]
    elif gather and cache.world_size != world:
        raise ValueError(f"FeatureCache holds {cache.world_size} ranks' rows but the loss gathers over {world}")
    a = cache_img.shape[0] // world
    b = image_emb.shape[0]
    if cache.offset + b > a:
        raise ValueError(f"FeatureCache: micro-batch slot {cache.offset}+{b} beyond the {a} rows per rank")
    if gathered is not None and gather:
        fresh_img, fresh_txt = _f32(gathered[0]), _f32(gathered[1])
    else:
        fresh_img, fresh_txt, _ = _gather_pair(image_emb, text_emb, gather)
    slots = torch.cat([torch.arange(q * a + cache.offset, q * a + cache.offset + b) for q in range(world)])
    slots = slots.to(image_emb.device)
    cols_img = cache_img.to(image_emb.device).index_copy(0, slots, fresh_img)
    cols_txt = cache_txt.to(image_emb.device).index_copy(0, slots, fresh_txt)
    rows = slice(rank * a, (rank + 1) * a)
    m = max(int(cache.num_micro), 1)
    scale_m = scale.detach() + (scale - scale.detach()) / m  # logit-scale gradient counted once
    labels = torch.arange(rank * a, (rank + 1) * a, device=image_emb.device)
    surrogate = _symmetric_ce(cols_img[rows], cols_txt[rows], cols_img, cols_txt, scale_m, labels)
    value = D.global_mean(surrogate)  # reported value: the mean over ranks, as report_global
    return m * surrogate + (value - m * surrogate.detach())


# ----------------------------------------------------------------------------- token level

def late_scores(text_tok: torch.Tensor, text_mask: torch.Tensor, image_tok: torch.Tensor,
                max_elems: int = 1 << 25) -> torch.Tensor:
    """[T, I] late-interaction scores: for caption t and image i, the mean over t's real tokens
    (``text_mask`` 1) of ``max_n <text_tok[t, l], image_tok[i, n]>``. Computed over chunks of
    images so that no intermediate holds more than about ``max_elems`` products."""
    t, length, _ = text_tok.shape
    n = image_tok.shape[1]
    step = max(1, max_elems // max(1, t * length * n))
    w = text_mask.to(text_tok.dtype)
    denom = w.sum(-1).clamp(min=1.0)
    cols = []
    for c in range(0, image_tok.shape[0], step):
        sim = torch.einsum("tld,ind->tiln", text_tok, image_tok[c:c + step].to(text_tok.dtype))
        best = sim.amax(dim=-1)  # [T, i, L]: each caption token's best image token
        cols.append((best * w[:, None, :]).sum(-1) / denom[:, None])
    return torch.cat(cols, dim=1)


def token_info_nce(image_tok: torch.Tensor, text_tok: torch.Tensor, text_mask: torch.Tensor, logit_scale,
                   gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE on ``late_scores`` (FILIP): ``image_tok`` [B, N, E] and ``text_tok``
    [B, L, E] L2-normalised tokens, ``text_mask`` [B, L]. Each rank scores its own rows against
    every rank's columns (autograd all-gather), as ``info_nce``: the value is the global loss and
    the gradient after DDP averaging is the single-process one. fp32 at least."""
    image_tok, text_tok, scale = _with_scale(image_tok, text_tok, logit_scale)
    mask = text_mask.to(image_tok.device)
    img_all, txt_all, off = _gather_pair(image_tok, text_tok, gather)
    mask_all = D.all_gather_no_grad(mask) if gather else mask
    labels = off + torch.arange(image_tok.shape[0], device=image_tok.device)
    logits_t2i = scale * late_scores(text_tok, mask, img_all)  # own captions x every image
    logits_i2t = scale * late_scores(txt_all, mask_all, image_tok).t()  # own images x every caption
    loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
    return report_global(loss)


# ----------------------------------------------------------------------------- triplet

def triplet_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, margin: float = 0.2,
                 gather: bool = True, hardest: bool = True, image_ids: torch.Tensor | None = None,
                 gathered: tuple | None = None) -> torch.Tensor:
    """Bidirectional hinge (cosine) loss (seed 004 / VSE++).

    For each row, negatives are the global columns with a different image id (or every other
    column when ``image_ids`` is None); ``hardest`` keeps the largest violation
    ``relu(margin - s_pos + s_neg)``, otherwise the violations are summed. The loss is the mean
    over rows of (image->text + text->image). Same gather/scaling contract as ``info_nce``.
    """
    image_emb, text_emb = _f32(image_emb), _f32(text_emb)
    if gathered is not None:
        img_all, txt_all, off = gathered
        img_all, txt_all = _f32(img_all), _f32(txt_all)
    else:
        img_all, txt_all, off = _gather_pair(image_emb, text_emb, gather)
    b, n = image_emb.shape[0], img_all.shape[0]
    dev = image_emb.device
    pos_cols = off + torch.arange(b, device=dev)
    if image_ids is not None:
        ids_all = D.all_gather_no_grad(image_ids) if n != b else image_ids
        invalid = image_ids.view(-1, 1).to(dev) == ids_all.view(1, -1).to(dev)
    else:
        invalid = torch.zeros(b, n, dtype=torch.bool, device=dev)
    invalid[torch.arange(b, device=dev), pos_cols] = True
    total = image_emb.new_zeros(())
    for rows, cols in ((image_emb, txt_all), (text_emb, img_all)):
        sim = rows @ cols.t()
        pos = sim[torch.arange(b, device=dev), pos_cols].unsqueeze(1)
        viol = (margin - pos + sim).clamp(min=0).masked_fill(invalid, 0.0)
        total = total + (viol.max(dim=1).values if hardest else viol.sum(dim=1)).mean()
    return report_global(total)


# ----------------------------------------------------------------------------- ITM

class ItmNegatives(NamedTuple):
    text_idx: torch.Tensor
    """[B] global index of the text paired with each local image."""
    image_idx: torch.Tensor
    """[B] global index of the image paired with each local text."""
    text_label: torch.Tensor
    """[B] 1 if the chosen text shares the image id (fallback only), else 0."""
    image_label: torch.Tensor
    """[B] idem for the chosen images."""


def _sample_rows(sim: torch.Tensor, valid: torch.Tensor, pos_cols: torch.Tensor, u: torch.Tensor,
                 floor: float, uniform_mix: float = 0.0) -> torch.Tensor:
    b, n = sim.shape
    dev = sim.device
    sim = sim.detach().double()
    masked = sim.masked_fill(~valid, float("-inf"))
    p = torch.softmax(masked, dim=1)
    if uniform_mix > 0:
        uni = valid.double() / valid.sum(dim=1, keepdim=True).clamp(min=1).double()
        p = (1.0 - uniform_mix) * p + uniform_mix * uni
    w = torch.where(valid, p + floor, torch.zeros_like(p))
    bad = ~torch.isfinite(w).all(dim=1) | (w.sum(dim=1) <= 0)
    if bad.any():  # fallback: uniform over every other column; itself only when N == 1
        other = torch.ones(b, n, dtype=torch.bool, device=dev)
        if n > 1:
            other[torch.arange(b, device=dev), pos_cols] = False
        w = torch.where(bad.unsqueeze(1), other.double(), w)
    cdf = torch.cumsum(w, dim=1)
    cdf = cdf / cdf[:, -1:]
    idx = torch.searchsorted(cdf, u.to(dev).double().unsqueeze(1).contiguous(), right=True).squeeze(1)
    # numerical edge (u above the last cdf value): take the last column with weight
    last = (n - 1) - torch.argmax((w > 0).flip(1).to(torch.int8), dim=1)
    return torch.where(idx >= n, last, idx)


@torch.no_grad()
def sample_itm_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, image_ids_local: torch.Tensor,
                         image_ids_global: torch.Tensor, generator: torch.Generator | None = None,
                         floor: float = 1e-4, row_offset: int | None = None,
                         uniform_mix: float = 0.0) -> ItmNegatives:
    """Choose one negative text per local image and one negative image per local text.

    ``sim_i2t``: [B, N] local images x global texts; ``sim_t2i``: [B, N] local texts x global
    images (detached; the model passes ``logit_scale * cosine``). ``image_ids_local`` [B],
    ``image_ids_global`` [N]. ``generator``: CPU generator in the same state on every rank (it is
    advanced by 2N uniforms). ``row_offset``: global index of local row 0 (default rank * B).
    ``uniform_mix``: share of uniform weight over the valid candidates (the curriculum).
    Returns global column indices and the ITM labels of the chosen pairs (see module docstring).
    """
    b, n = sim_i2t.shape
    dev = sim_i2t.device
    if row_offset is None:
        row_offset = D.get_rank() * b if n != b else 0
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)[row_offset:row_offset + b]
    ids_l = image_ids_local.to(dev).view(-1, 1)
    ids_g = image_ids_global.to(dev).view(1, -1)
    valid = ids_l != ids_g
    pos_cols = row_offset + torch.arange(b, device=dev)
    a = float(uniform_mix)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"uniform_mix must be in [0, 1], got {a}")
    t_idx = _sample_rows(sim_i2t, valid, pos_cols, u[:, 0], floor, a)
    i_idx = _sample_rows(sim_t2i, valid, pos_cols, u[:, 1], floor, a)
    ids_lv = image_ids_local.to(dev)
    ids_gv = image_ids_global.to(dev)
    return ItmNegatives(t_idx, i_idx, (ids_gv[t_idx] == ids_lv).long(), (ids_gv[i_idx] == ids_lv).long())


def itm_labels(neg: ItmNegatives) -> torch.Tensor:
    """Labels of the 3B fused pairs in the order [positives, (image, neg text), (neg image, text)]."""
    ones = torch.ones_like(neg.text_label)
    return torch.cat([ones, neg.text_label, neg.image_label])


def global_item_mean(local_sum: torch.Tensor, local_count) -> torch.Tensor:
    """``local_sum / mean_over_ranks(count)`` reported as the global mean (module docstring:
    losses over a variable number of items). Exact for any split of the items over ranks."""
    count = torch.as_tensor(float(local_count), dtype=torch.float32, device=local_sum.device)
    mean_count = D.global_mean(count).clamp(min=1.0).to(local_sum.dtype)
    return report_global(local_sum / mean_count)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-way cross-entropy (fp32) averaged over the pairs of all ranks (each rank may hold a
    different number); returns ``(loss, accuracy)`` (accuracy detached, global)."""
    logits = _f32(logits)
    n = labels.shape[0]
    loss = global_item_mean(F.cross_entropy(logits, labels, reduction="sum"), n)
    correct = (logits.argmax(dim=1) == labels).to(logits.dtype).sum().detach()  # >= fp32, as the loss
    acc = global_item_mean(correct, n).detach()
    return loss, acc


def itm_rank_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise ranking over the ITM passes (RankNet, as re-rankers are trained in retrieval):
    ``softplus(s_neg - s_pos)`` for each row's (image, negative text) and (negative image, text)
    pass against the row's positive, ``s`` the match log-odds; negatives whose label is 1 (a
    duplicate of the positive) are left out. ``logits`` [3R, 2] in ``itm_labels`` order. Averaged
    over the pairs of all ranks; returns ``(loss, share of pairs ranked right)``."""
    logits = _f32(logits)
    s = logits[:, 1] - logits[:, 0]
    r = s.shape[0] // 3
    pos, negs = s[:r], torch.stack([s[r:2 * r], s[2 * r:]])
    valid = (labels.view(3, r)[1:] == 0).to(s.dtype)
    n = valid.sum().detach()
    loss = global_item_mean((F.softplus(negs - pos) * valid).sum(), n)
    right = ((pos > negs).to(s.dtype) * valid).sum().detach()
    return loss, global_item_mean(right, n).detach()


def itm_uniform_share(step: int, curriculum_steps: int, final_mix: float) -> float:
    """The curriculum: uniform share 1 at forward 0 falling linearly to ``final_mix`` at
    ``curriculum_steps`` (constant ``final_mix`` without a curriculum)."""
    if curriculum_steps <= 0:
        return float(final_mix)
    t = min(max(step, 0) / float(curriculum_steps), 1.0)
    return float(1.0 - (1.0 - final_mix) * t)


@torch.no_grad()
def select_hardest(hardness_local: torch.Tensor, fraction: float, gather: bool = True) -> torch.Tensor:
    """Bool mask of this rank's rows among the ``ceil(fraction * N)`` hardest of the global batch
    (largest ``hardness``; ties to the lower global index), the same choice one process holding
    the global batch makes. ``fraction >= 1`` keeps every row."""
    b = hardness_local.shape[0]
    if fraction >= 1.0:
        return torch.ones(b, dtype=torch.bool, device=hardness_local.device)
    h = hardness_local.detach().double()
    h_all = D.all_gather_no_grad(h) if gather else h
    n = h_all.shape[0]
    k = max(1, math.ceil(float(fraction) * n))
    order = torch.sort(h_all.cpu(), descending=True, stable=True).indices[:k]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[order] = True
    off = D.get_rank() * b if gather else 0
    return chosen[off:off + b].to(hardness_local.device)


# ----------------------------------------------------------------------------- MLM

@torch.no_grad()
def mlm_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None,
             prob: float, mask_token_id: int, vocab_size: int, row_offset: int = 0,
             num_rows: int | None = None, focus_ids: Sequence[int] = (), focus_prob: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of this rank's captions, chosen as one process holding all ``num_rows``
    global rows would: uniforms are drawn for every global row from ``generator`` (in the same
    state on every rank) and rows ``row_offset ..`` are used. Candidates: real tokens except the
    first ([CLS]) and the last real one ([SEP]). Of the chosen, 80 % become ``mask_token_id``,
    10 % a random token, 10 % stay. Tokens in ``focus_ids`` are chosen with ``focus_prob``
    instead of ``prob`` when it is > 0 (attribute and relation words: loss.mlm_word_prob).
    Returns ``(masked_ids, labels)``; labels are -100 where no prediction is made."""
    b, n_tok = input_ids.shape
    num_rows = b if num_rows is None else int(num_rows)
    u = torch.rand(num_rows, n_tok, 2, generator=generator, dtype=torch.float64)[row_offset:row_offset + b]
    rnd = torch.randint(int(vocab_size), (num_rows, n_tok), generator=generator)[row_offset:row_offset + b]
    u, rnd = u.to(input_ids.device), rnd.to(input_ids.device)
    real = attention_mask.bool()
    lengths = real.long().sum(dim=1, keepdim=True)
    pos = torch.arange(n_tok, device=input_ids.device).unsqueeze(0)
    candidate = real & (pos > 0) & (pos < lengths - 1)
    p_tok = torch.full(input_ids.shape, float(prob), dtype=torch.float64, device=input_ids.device)
    if focus_prob > 0 and len(focus_ids):
        focus = torch.isin(input_ids, torch.as_tensor(list(focus_ids), dtype=input_ids.dtype, device=input_ids.device))
        p_tok = torch.where(focus, torch.full_like(p_tok, float(focus_prob)), p_tok)
    chosen = candidate & (u[..., 0] < p_tok)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    to_mask = chosen & (u[..., 1] < 0.8)
    to_random = chosen & (u[..., 1] >= 0.8) & (u[..., 1] < 0.9)
    ids = torch.where(to_mask, torch.full_like(input_ids, int(mask_token_id)), input_ids)
    ids = torch.where(to_random, rnd.to(input_ids.dtype), ids)
    return ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the predicted tokens of all ranks (``logits`` [M, V] and ``labels`` [M]
    of this rank's chosen tokens, M may differ per rank); returns ``(loss, accuracy)``."""
    logits = _f32(logits)
    m = labels.shape[0]
    loss = global_item_mean(F.cross_entropy(logits, labels, reduction="sum"), m)
    correct = (logits.argmax(dim=1) == labels).to(logits.dtype).sum().detach() if m else logits.new_zeros(())
    return loss, global_item_mean(correct, m).detach()


# ----------------------------------------------------------------------------- combined

def combined(parts: dict, loss_cfg) -> dict:
    """``{"loss": contrastive_weight * loss_itc + itm_weight * loss_itm + itm_rank_weight *
    loss_itm_rank + mlm_weight * loss_mlm + itc_token_weight * loss_itc_token, **detached parts}``."""
    total = loss_cfg.contrastive_weight * _f32(parts["loss_itc"])
    if "loss_itm" in parts and loss_cfg.itm_weight:
        total = total + loss_cfg.itm_weight * _f32(parts["loss_itm"])
    if "loss_itm_rank" in parts and getattr(loss_cfg, "itm_rank_weight", 0.0):
        total = total + loss_cfg.itm_rank_weight * _f32(parts["loss_itm_rank"])
    if "loss_mlm" in parts and getattr(loss_cfg, "mlm_weight", 0.0):
        total = total + loss_cfg.mlm_weight * _f32(parts["loss_mlm"])
    if "loss_itc_token" in parts and getattr(loss_cfg, "itc_token_weight", 0.0):
        total = total + loss_cfg.itc_token_weight * _f32(parts["loss_itc_token"])
    out = {"loss": total}
    out.update({k: (_f32(v.detach()) if torch.is_tensor(v) else v) for k, v in parts.items()})
    return out
