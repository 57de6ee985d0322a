"""Retrieval metrics: Recall@k both directions with several captions per image (COCO protocol).

Pure tensor math, no model and no process group: ``evaluate.py`` produces the similarity
matrix, this module turns it into numbers.

Layout: ``scores[i, t]`` is the similarity of unique image ``i`` (deduplicated by image id)
and caption ``t``; ``caption_image[t]`` is the index of caption ``t``'s image.

- image -> text: query image ``i`` is a hit at ``k`` if ANY of its captions is in its top k.
- text -> image: query caption ``t`` is a hit at ``k`` if its image is in its top k.

Ties (the rule, deterministic and pessimistic): the rank of a query is the number of *wrong*
candidates whose score is greater than **or equal to** the best score of a right candidate
(0-based). A wrong candidate tied with the best right one therefore always counts against the
query; right candidates tied with each other do not hurt. ``hit@k = rank < k``. A constant
score matrix thus gives rank = (number of wrong candidates) for every query.
"""

from __future__ import annotations

import torch


def pessimistic_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of the best right candidate of each query.

    scores: [Q, C] float, positive: [Q, C] bool (at least one True per row).
    Returns int64 [Q]: #wrong candidates with score >= max score over the right ones.
    """
    if scores.shape != positive.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positive {tuple(positive.shape)} differ")
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every query needs at least one right candidate")
    out = []
    for rows in _row_chunks(scores.shape):  # bounded float64 temporaries for large sets
        s, pos = scores[rows].double(), positive[rows]
        best = s.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values  # [q, 1]
        out.append(((s >= best) & ~pos).sum(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _row_chunks(shape, max_elements: int = 1 << 24):
    step = max(1, max_elements // max(int(shape[1]), 1))
    return [slice(i, i + step) for i in range(0, int(shape[0]), step)]


def recall_at(ranks: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """Percentage of queries whose rank is < k, for each k."""
    n = max(int(ranks.numel()), 1)
    return {k: 100.0 * float((ranks < k).sum()) / n for k in ks}


def caption_positive_mask(caption_image: torch.Tensor, num_images: int) -> torch.Tensor:
    """[num_images, num_captions] bool: caption t belongs to image i."""
    return torch.arange(num_images).unsqueeze(1) == caption_image.long().unsqueeze(0)


def retrieval_ranks(scores: torch.Tensor, caption_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t_ranks [num_images], t2i_ranks [num_captions]) from image x caption scores."""
    pos = caption_positive_mask(caption_image, scores.shape[0])
    if not bool(pos.any(dim=1).all()):
        raise ValueError("an image has no caption")
    return pessimistic_ranks(scores, pos), pessimistic_ranks(scores.t(), pos.t())


def metrics_from_ranks(i2t: torch.Tensor, t2i: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Flat dict: i2t_R@k, t2i_R@k, mean_recall (over both directions and all k), median ranks
    (1-based, as usually reported) and counts."""
    out: dict[str, float] = {}
    r_i2t, r_t2i = recall_at(i2t, ks), recall_at(t2i, ks)
    for k in ks:
        out[f"i2t_R@{k}"] = r_i2t[k]
    for k in ks:
        out[f"t2i_R@{k}"] = r_t2i[k]
    out["mean_recall"] = (sum(r_i2t.values()) + sum(r_t2i.values())) / (2 * len(ks))
    out["i2t_median_rank"] = float(i2t.double().median()) + 1 if i2t.numel() else 0.0
    out["t2i_median_rank"] = float(t2i.double().median()) + 1 if t2i.numel() else 0.0
    out["num_images"] = int(i2t.numel())
    out["num_captions"] = int(t2i.numel())
    return out


def retrieval_metrics(scores: torch.Tensor, caption_image: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Recall@k both directions for an image x caption score matrix (see module docstring)."""
    return metrics_from_ranks(*retrieval_ranks(scores, caption_image), ks)


def topk_candidates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, min(k, C)] candidate indices by descending score; ties broken by lower index
    (stable sort), so the choice is deterministic and uses no labels."""
    k = min(k, scores.shape[1])
    parts = [torch.sort(scores[rows], dim=1, descending=True, stable=True).indices[:, :k]
             for rows in _row_chunks(scores.shape)]
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.long)


def rerank_scores(scores: torch.Tensor, candidates: torch.Tensor, candidate_scores: torch.Tensor) -> torch.Tensor:
    """Scores after re-ranking: the candidates of each row (re-scored, e.g. ITM log-odds) come
    first, ordered by their new score; every other item keeps its contrastive score below them.

    scores: [Q, C], candidates: [Q, K] indices, candidate_scores: [Q, K]. Returns float64 [Q, C]
    that ``pessimistic_ranks`` can rank directly (the tie rule then applies inside the re-scored
    block and inside the rest alike).
    """
    base = scores.double()
    new = candidate_scores.double()
    if base.numel() == 0 or new.numel() == 0:
        return base
    # Lift the re-scored block above every contrastive score: offset so min(new) > max(base).
    offset = float(base.max()) - float(new.min()) + 1.0
    out = base.clone()
    out.scatter_(1, candidates.long(), new + offset)
    return out
