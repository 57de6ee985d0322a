"""Parameter and FLOP counting for MFU logging.

``training_flops_per_sample(model_cfg, loss_cfg, text_len)`` counts multiply-adds x 2 of the
forward pass and multiplies by 3 (forward + backward = 3 x forward), i.e. the usual
``6 x params-touched x tokens`` plus the attention-score terms ``2 x 2 x n^2 x width`` per
layer and forward. Counted per sample:
- image unimodal pass over ``1 + (image_size/patch_size)^2`` tokens (patch embedding or the resnet stem included),
- text unimodal pass over ``text_len`` tokens (and ``itc_word_negatives`` of one more, for the
  word-changed captions),
- with ITM (``itm_weight > 0``): 3 fused passes (positive, negative text, negative image) over
  ``image tokens + text_len`` tokens, times ``itm_fraction`` (the share of rows scored),
- with MLM (``mlm_weight > 0``): 1 more fused pass and the MLM head on ``mlm_prob`` of the
  ``text_len`` tokens (vocabulary size unknown here: the head's decoder counts as ``width^2``),
- unified with ``fusion_source: towers``: a fused pass is ``fusion_depth`` blocks (not
  ``depth``), and every negative image / negative or masked caption first takes its unimodal
  pass (the positives reuse theirs),
- projections, the contrastive logits (against the local batch only — not known here; they are
  negligible) and the ITM head.
Embedding lookups cost nothing. The dual_encoder estimate uses the same transformer formula for
the BERT text tower and treats the image tower as a ViT-like stack of the same size (an
approximation: CNN/timm towers differ); its fusion head is counted as ``fusion_depth`` layers.
"""

from __future__ import annotations

import torch.nn as nn

from mmpretrain.models.config import LossConfig, ModelConfig


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _layer_fwd(width: int, n: int, mlp_ratio: float) -> float:
    linear = 4 * width * width + 2 * width * int(width * mlp_ratio)  # qkv + proj + fc1 + fc2
    attn = 2 * n * n * width  # q.k^T and attn.v
    return 2.0 * (linear * n + attn)


def forward_flops_per_sample(cfg: ModelConfig, loss_cfg: LossConfig, text_len: int) -> float:
    w, d = cfg.width, cfg.depth
    n_img = 1 + (cfg.image_size // cfg.patch_size) ** 2
    patch = 2.0 * (n_img - 1) * 3 * cfg.patch_size ** 2 * w
    if getattr(cfg, "image_stem", "patch") == "resnet":  # 7x7 stride-2 conv 3 -> 64, then (p/4)^2 x 64 -> w
        patch = 2.0 * (cfg.image_size // 2) ** 2 * 7 * 7 * 3 * 64 + 2.0 * (n_img - 1) * 64 * (cfg.patch_size // 4) ** 2 * w
    heads = 2.0 * 2 * w * cfg.embed_dim
    f = patch + d * (_layer_fwd(w, n_img, cfg.mlp_ratio) + _layer_fwd(w, text_len, cfg.mlp_ratio)) + heads
    frac = min(max(float(getattr(loss_cfg, "itm_fraction", 1.0)), 0.0), 1.0)
    towers = cfg.arch == "unified" and getattr(cfg, "fusion_source", "inputs") == "towers"
    fused = (cfg.fusion_depth if towers else d) * _layer_fwd(w, n_img + text_len, cfg.mlp_ratio)
    image_pass, text_pass = d * _layer_fwd(w, n_img, cfg.mlp_ratio), d * _layer_fwd(w, text_len, cfg.mlp_ratio)
    wc = min(max(float(getattr(loss_cfg, "itc_word_negatives", 0.0)), 0.0), 1.0)
    f += wc * text_pass  # contrastive word negatives: one more text pass over those captions
    if getattr(loss_cfg, "mlm_weight", 0.0) > 0 and cfg.arch == "unified":
        masked = float(loss_cfg.mlm_prob) * text_len
        f += fused + 2.0 * masked * 2 * w * w + (text_pass if towers else 0.0)
    if loss_cfg.itm_weight > 0:
        if cfg.arch == "unified":
            # the fused pass re-embeds the negative image (patch embedding) once per sample;
            # towers: the negative image and caption take their unimodal passes too
            f += frac * (3 * fused + patch + (image_pass + text_pass if towers else 0.0))
        else:
            fusion_layer = 2.0 * (4 * w * w * text_len + 2 * text_len * n_img * w
                                  + 2 * w * int(w * cfg.mlp_ratio) * text_len)
            depth = max(cfg.fusion_depth, 1) if cfg.fusion == "cross_attention" else 0
            f += 3 * depth * fusion_layer + 3 * 2.0 * 4 * w * w
            # negatives need one more pass of each tower
            f += patch + d * (_layer_fwd(w, n_img, cfg.mlp_ratio) + _layer_fwd(w, text_len, cfg.mlp_ratio))
        f += 3 * 2.0 * (w * w + 2 * w)  # ITM pooler + classifier
    return f


def training_flops_per_sample(model_cfg: ModelConfig, loss_cfg: LossConfig, text_len: int) -> float:
    """Forward + backward FLOPs per sample (3 x forward)."""
    return 3.0 * forward_flops_per_sample(model_cfg, loss_cfg, text_len)
