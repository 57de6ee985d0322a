"""ITM as a standard model: ``itm/``, a ``transformers.ViltForImageAndTextRetrieval`` directory.

The unified model without modality experts and with ``model.itm_readout: text_cls`` *is* ViLT:
one pre-LayerNorm stack over ``[image; text]`` (ViLT orders ``[text; image]``; attention does
not care), the ITM read-out on the fused text [CLS] through a dense+tanh pooler. Our 2-way
classifier becomes ViLT's 1-logit ``rank_output``: ``sigmoid(w1·h - w0·h + b1 - b0) =
softmax(fc(h))[1]``, so ``sigmoid(logits) = score_pairs``.

Mapping (text LayerNorm eps: the scale trick of ``towers``; every LayerNorm uses 1e-6):
text embeddings -> ``text_embeddings`` (tables scaled), our modality-type embeddings ->
``token_type_embeddings`` rows 0 (text) and 1 (image), ``image_embed`` -> ``cls_token``,
``position_embeddings``, ``patch_embeddings``; ``blocks.i`` -> ``encoder.layer.i``
(``norm1`` = ``layernorm_before``, ``norm2`` = ``layernorm_after``), ``norm`` -> ``layernorm``,
``itm_head.pooler`` -> ``pooler.dense``. ViLT's patch sampling with ``max_image_length=-1``
keeps every patch (in a random order, which the output does not depend on beyond rounding).

Not expressible, with the reason returned by ``vilt_unsupported``: modality experts (VLMo: ViLT
has one FFN per block), ``itm_readout: image_cls`` (ViLT pools the first *text* token), the
dual encoder (its ITM head is a separate fusion module).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mmpretrain.export.format import ExportError, load_state_strict
from mmpretrain.export.towers import BLOCK_EPS, _check_close, _clone, split_qkv


def vilt_unsupported(backbone) -> str | None:
    """Why this model has no ViLT form (one line), or None when it has one."""
    c = backbone.cfg
    if c.arch != "unified":
        return ("dual_encoder: the ITM head is a separate fusion module (cross-attention or linear) over two "
                "towers, not ViLT's single stream; no itm/ directory")
    if c.modality_experts:
        return ("modality_experts (VLMo): ViLT has one feed-forward per block, not per-modality experts; "
                "ITM needs load_pretrained(...).score_pairs")
    if getattr(c, "fusion_source", "inputs") == "towers":
        return ("model.fusion_source='towers': the fused pass runs dedicated fusion blocks over the unimodal "
                "outputs, not ViLT's one stack over the input embeddings; ITM needs load_pretrained(...).score_pairs")
    if getattr(c, "image_stem", "patch") != "patch":
        return (f"model.image_stem={c.image_stem!r}: ViLT embeds linear patches, not a convolutional stem; "
                "ITM needs load_pretrained(...).score_pairs")
    if getattr(c, "itm_head", "pooler") != "pooler":
        return (f"model.itm_head={c.itm_head!r}: ViLT's ITM is a pooler + classifier on one fused token, not a "
                "product of the pooled, projected fused towers; ITM needs load_pretrained(...).score_pairs")
    if getattr(c, "itm_readout", "image_cls") != "text_cls":
        return (f"model.itm_readout={getattr(c, 'itm_readout', 'image_cls')!r}: ViLT reads the fused *text* [CLS]; "
                "ITM needs load_pretrained(...).score_pairs")
    return None


def vilt_state(backbone):
    """(ViltConfig, state dict) of ``ViltForImageAndTextRetrieval`` for the unified model."""
    from transformers import ViltConfig

    why = vilt_unsupported(backbone)
    if why:
        raise ExportError(f"itm: {why}")
    c = backbone.cfg
    te = backbone.text_embed
    scale = math.sqrt(BLOCK_EPS / te.LayerNorm.eps)
    vcfg = ViltConfig(vocab_size=te.word_embeddings.num_embeddings, type_vocab_size=2, modality_type_vocab_size=2,
                      max_position_embeddings=te.position_embeddings.num_embeddings, hidden_size=c.width,
                      num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                      intermediate_size=int(c.width * c.mlp_ratio), hidden_act="gelu", hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, layer_norm_eps=BLOCK_EPS, image_size=c.image_size,
                      patch_size=c.patch_size, num_channels=3, qkv_bias=True, max_image_length=-1, num_images=-1,
                      pad_token_id=0)
    sd = _clone(backbone.state_dict())
    v = "vilt."
    fc_w, fc_b = sd["itm_head.fc.weight"], sd["itm_head.fc.bias"]
    out = {
        v + "embeddings.cls_token": sd["image_embed.cls_token"],
        v + "embeddings.position_embeddings": sd["image_embed.pos_embed"],
        v + "embeddings.patch_embeddings.projection.weight": sd["image_embed.patch_embed.proj.weight"],
        v + "embeddings.patch_embeddings.projection.bias": sd["image_embed.patch_embed.proj.bias"],
        v + "embeddings.token_type_embeddings.weight": torch.cat(
            [sd["text_embed.type_embed"].reshape(1, -1), sd["image_embed.type_embed"].reshape(1, -1)]),
        v + "embeddings.text_embeddings.word_embeddings.weight": sd["text_embed.word_embeddings.weight"] * scale,
        v + "embeddings.text_embeddings.position_embeddings.weight": sd["text_embed.position_embeddings.weight"] * scale,
        v + "embeddings.text_embeddings.token_type_embeddings.weight": sd["text_embed.token_type_embeddings.weight"] * scale,
        v + "embeddings.text_embeddings.LayerNorm.weight": sd["text_embed.LayerNorm.weight"],
        v + "embeddings.text_embeddings.LayerNorm.bias": sd["text_embed.LayerNorm.bias"],
        v + "layernorm.weight": sd["norm.weight"], v + "layernorm.bias": sd["norm.bias"],
        v + "pooler.dense.weight": sd["itm_head.pooler.weight"], v + "pooler.dense.bias": sd["itm_head.pooler.bias"],
        "rank_output.weight": (fc_w[1] - fc_w[0]).reshape(1, -1),
        "rank_output.bias": (fc_b[1] - fc_b[0]).reshape(1),
    }
    w = c.width
    for i in range(c.depth):
        b, p = f"blocks.{i}.", f"{v}encoder.layer.{i}."
        out.update(split_qkv(sd, b, p + "attention.attention.", w))
        out.update({p + "attention.output.dense.weight": sd[b + "attn.proj.weight"],
                    p + "attention.output.dense.bias": sd[b + "attn.proj.bias"],
                    p + "intermediate.dense.weight": sd[b + "mlp.fc1.weight"],
                    p + "intermediate.dense.bias": sd[b + "mlp.fc1.bias"],
                    p + "output.dense.weight": sd[b + "mlp.fc2.weight"],
                    p + "output.dense.bias": sd[b + "mlp.fc2.bias"],
                    p + "layernorm_before.weight": sd[b + "norm1.weight"],
                    p + "layernorm_before.bias": sd[b + "norm1.bias"],
                    p + "layernorm_after.weight": sd[b + "norm2.weight"],
                    p + "layernorm_after.bias": sd[b + "norm2.bias"]})
    return vcfg, out


def export_itm(model, directory: Path, probe_pixels: torch.Tensor, probe_ids: torch.Tensor,
               probe_mask: torch.Tensor) -> dict:
    """Write ``itm/`` (ViltForImageAndTextRetrieval) after checking ``sigmoid(logits)`` against
    ``itm_logits``; returns what it holds."""
    from transformers import ViltForImageAndTextRetrieval

    vcfg, sd = vilt_state(model.backbone)
    vilt = ViltForImageAndTextRetrieval(vcfg)
    load_state_strict(vilt, sd, "itm (ViltForImageAndTextRetrieval)")
    vilt.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)  # ViLT's patch order is drawn from torch's RNG
        got = vilt(input_ids=probe_ids, attention_mask=probe_mask, pixel_values=probe_pixels,
                   pixel_mask=torch.ones(probe_pixels.shape[0], *probe_pixels.shape[-2:], dtype=torch.long)
                   ).logits.reshape(-1).sigmoid()
        want = model.itm_logits(probe_pixels, probe_ids, probe_mask).softmax(-1)[:, 1]
    _check_close("itm ViltForImageAndTextRetrieval sigmoid(logits) vs score_pairs", got, want)
    vilt.save_pretrained(str(directory), safe_serialization=True)
    return {"library": "transformers", "class": "ViltForImageAndTextRetrieval",
            "holds": "the whole model; sigmoid(logits) = score_pairs (pixel_values from the image_encoder "
                     "preprocessing, input_ids/attention_mask from the tokenizer)"}
