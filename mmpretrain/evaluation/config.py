"""Evaluation section of the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    """The k of the Recall@k metrics (image->text and text->image)."""
    itm_rerank_k: int = 16
    """Re-score the top-k of the contrastive ranking with the ITM head (0 disables)."""
    itm_rerank_score: Literal["itm", "itm+itc"] = "itm+itc"
    """The re-ranking score of a candidate: 'itm' (the ITM log-odds alone, as ALBEF) or
    'itm+itc' (the ITM log-odds plus the contrastive logit, logit_scale x cosine, as BLIP adds
    the similarity: the two are log-likelihood scores of the same pair, and the sum keeps what
    the contrastive ranking knows where the ITM head is unsure)."""
    batch_size: int = 64
    """Per-rank batch of evaluation's model passes after the held-out set is read: ITM re-scoring
    pairs, re-encoded texts, classified images (the held-out set itself is read in
    ``data.global_batch_size`` batches)."""
    max_samples: int = 0
    """At most this many held-out samples are evaluated, an equal share per rank (0: the whole
    held-out set)."""
    report: bool = True
    """Write report.html/report.png next to metrics.json."""
    num_examples: int = 6
    """Queries shown in the report grid."""
    compositional: bool = True
    """Run the compositional test (one-change captions; needs the synthetic shards' scene
    metadata, skipped with a note otherwise). See docs/evaluation.md."""
    compositional_max_images: int = 0
    """Images the compositional test uses, the first in key order (0: all)."""
    itm_hard_negatives: bool = True
    """ITM accuracy on positives and mined hard negatives of the held-out set."""
    classify: str = ""
    """Zero-shot classification set evaluated by ``mmpretrain eval`` (an ImageFolder tree or
    labelled shards, see docs/evaluation.md; ``--classify DIR`` sets it; empty: none)."""
    classify_label_field: str = "label"
    """Sample-json field holding the class name in labelled shards (the synthetic split also
    has ``color``)."""
    classify_templates: list[str] = field(default_factory=list)
    """Prompt templates (``{}`` = the class name; an entry may be a file of templates, one per
    line). Empty: the dataset's own (its manifest), else the default set
    (``classify.DEFAULT_TEMPLATES``)."""
    classify_itm_k: int = 5
    """Re-score the top-k classes of each image with the ITM head (0 disables); combined as
    ``itm_rerank_score`` says."""
    classify_itm_prompts: Literal["best", "mean"] = "best"
    """ITM log-odds of a class: 'best', of the one prompt of the class closest to the image by
    cosine (k fused passes per image), or 'mean' over all its templates' prompts (k x templates
    passes)."""
    classify_max_images: int = 0
    """Images classified, the first in key order (0: all)."""
    classify_linear_probe: bool = True
    """Also fit a logistic-regression probe on the image embeddings (4-fold, held-out top-1):
    what the image tower encodes, beside what the zero-shot prompts find (classify.py)."""
