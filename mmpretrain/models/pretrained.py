"""Initialise model parts from local pretrained checkpoints: ``apply_pretrained(model, cfg)``,
which ``build_model`` calls on the new model (before any ZeRO-3 partitioning). Nothing here
reaches a hub.

- ``image_pretrained``: a timm ViT checkpoint *file* (``.safetensors`` or a torch state dict,
  optionally wrapped in ``{"state_dict"|"model": ...}``). Copied into the unified model:
  ``patch_embed``, ``cls_token``, ``pos_embed`` (resampled when the grid differs), ``blocks.i``
  (attention, ``norm1``/``norm2``/``mlp`` = the image expert) and the final ``norm``, each only
  when shapes match. With identical width/depth/heads, ``encode_image`` tokens equal timm's
  ``forward_features``.
- ``text_pretrained``: a BERT directory (``save_pretrained`` layout). The embeddings
  (word, position — the first ``max_text_length`` rows —, token type, LayerNorm) are copied
  exactly; ``TextEmbed.bert_embeddings`` then equals ``BertModel.embeddings``. If width and
  depth match, the encoder layers are copied too: into the text experts (``mlp_text``,
  ``norm2_text``) when ``modality_experts``, and into the shared attention only when no ViT
  blocks were loaded (the image checkpoint wins the shared weights, as in VLMo). BERT is
  post-LayerNorm and the stack is pre-LayerNorm, so copied layers are an initialisation, not an
  exact reproduction of BERT's encoder (mapping: attention.output.LayerNorm -> norm2,
  output.LayerNorm of layer l-1 -> norm1 of layer l).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def read_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


@torch.no_grad()
def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, copied: list) -> bool:
    if tuple(dst.shape) != tuple(src.shape):
        log.warning("pretrained: skip %s (shape %s vs %s)", name, tuple(src.shape), tuple(dst.shape))
        return False
    dst.copy_(src.to(dst.dtype))
    copied.append(name)
    return True


@torch.no_grad()
def load_timm_vit(model, path: str) -> list[str]:
    """Copy a timm ViT state dict into a ``UnifiedTransformer``; returns the copied names."""
    from timm.layers import resample_abs_pos_embed

    sd = read_state_dict(path)
    ie = model.image_embed
    copied: list[str] = []
    for k in ("proj.weight", "proj.bias"):
        if f"patch_embed.{k}" in sd:
            _copy(ie.patch_embed.get_parameter(k), sd[f"patch_embed.{k}"], f"patch_embed.{k}", copied)
    if "cls_token" in sd:
        _copy(ie.cls_token, sd["cls_token"], "cls_token", copied)
    if "pos_embed" in sd:
        pe = sd["pos_embed"]
        if pe.shape != ie.pos_embed.shape and pe.shape[-1] == ie.pos_embed.shape[-1]:
            grid = ie.patch_embed.grid_size
            pe = resample_abs_pos_embed(pe, new_size=list(grid), num_prefix_tokens=1)
        _copy(ie.pos_embed, pe, "pos_embed", copied)
    model._vit_blocks_loaded = False
    for i, blk in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        names = [n for n in sd if n.startswith(prefix)]
        if not names:
            continue
        own = dict(blk.named_parameters())
        for n in names:
            local = n[len(prefix):]
            if local in own:
                _copy(own[local], sd[n], n, copied)
        model._vit_blocks_loaded = True
    for k in ("weight", "bias"):
        if f"norm.{k}" in sd:
            _copy(model.norm.get_parameter(k), sd[f"norm.{k}"], f"norm.{k}", copied)
    if not copied:
        raise ValueError(f"image_pretrained {path}: no tensor matched a timm ViT layout")
    log.info("image_pretrained: copied %d tensors from %s", len(copied), path)
    return copied


def _bert_state_dict(path: str) -> tuple[dict, object]:
    from transformers import BertModel

    bert = BertModel.from_pretrained(path, local_files_only=True)
    sd = {k.removeprefix("bert."): v for k, v in bert.state_dict().items()}
    return sd, bert.config


@torch.no_grad()
def load_bert(model, path: str) -> list[str]:
    """Copy a local BERT directory into a ``UnifiedTransformer``; returns the copied names."""
    sd, bcfg = _bert_state_dict(path)
    te = model.text_embed
    copied: list[str] = []
    for name in ("word_embeddings", "token_type_embeddings"):
        _copy(getattr(te, name).weight, sd[f"embeddings.{name}.weight"], f"embeddings.{name}.weight", copied)
    pos = sd["embeddings.position_embeddings.weight"][: te.position_embeddings.weight.shape[0]]
    _copy(te.position_embeddings.weight, pos, "embeddings.position_embeddings.weight", copied)
    for k in ("weight", "bias"):
        _copy(te.LayerNorm.get_parameter(k), sd[f"embeddings.LayerNorm.{k}"], f"embeddings.LayerNorm.{k}", copied)
    cfg = model.cfg
    if bcfg.hidden_size == cfg.width and bcfg.num_hidden_layers == cfg.depth and \
            bcfg.intermediate_size == int(cfg.width * cfg.mlp_ratio):
        shared = not getattr(model, "_vit_blocks_loaded", False)
        experts = cfg.modality_experts
        for i, blk in enumerate(model.blocks):
            p = f"encoder.layer.{i}."
            if shared:
                qkv_w = torch.cat([sd[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")])
                qkv_b = torch.cat([sd[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
                _copy(blk.attn.qkv.weight, qkv_w, p + "qkv.weight", copied)
                _copy(blk.attn.qkv.bias, qkv_b, p + "qkv.bias", copied)
                _copy(blk.attn.proj.weight, sd[p + "attention.output.dense.weight"], p + "proj.weight", copied)
                _copy(blk.attn.proj.bias, sd[p + "attention.output.dense.bias"], p + "proj.bias", copied)
                if i > 0:
                    q = f"encoder.layer.{i - 1}.output.LayerNorm."
                    _copy(blk.norm1.weight, sd[q + "weight"], q + "weight", copied)
                    _copy(blk.norm1.bias, sd[q + "bias"], q + "bias", copied)
            if experts or shared:
                mlp = blk.mlp_text if experts else blk.mlp
                norm2 = blk.norm2_text if experts else blk.norm2
                _copy(mlp.fc1.weight, sd[p + "intermediate.dense.weight"], p + "fc1.weight", copied)
                _copy(mlp.fc1.bias, sd[p + "intermediate.dense.bias"], p + "fc1.bias", copied)
                _copy(mlp.fc2.weight, sd[p + "output.dense.weight"], p + "fc2.weight", copied)
                _copy(mlp.fc2.bias, sd[p + "output.dense.bias"], p + "fc2.bias", copied)
                _copy(norm2.weight, sd[p + "attention.output.LayerNorm.weight"], p + "norm2.weight", copied)
                _copy(norm2.bias, sd[p + "attention.output.LayerNorm.bias"], p + "norm2.bias", copied)
    else:
        log.info("text_pretrained: width/depth differ, encoder layers not copied")
    log.info("text_pretrained: copied %d tensors from %s", len(copied), path)
    return copied


@torch.no_grad()
def load_bert_into_bert(bert, path: str) -> list[str]:
    """dual_encoder: copy every matching tensor of a local BERT directory into the text tower."""
    sd, _ = _bert_state_dict(path)
    own = dict(bert.named_parameters())
    copied: list[str] = []
    for k, v in sd.items():
        if k in own:
            dst = own[k]
            if k == "embeddings.position_embeddings.weight":
                v = v[: dst.shape[0]]
            _copy(dst, v, k, copied)
    return copied


@torch.no_grad()
def load_timm_into_backbone(backbone, path: str) -> list[str]:
    """dual_encoder: copy every matching tensor of a timm checkpoint into the timm image tower."""
    sd = read_state_dict(path)
    own = dict(backbone.named_parameters())
    own.update(dict(backbone.named_buffers()))
    copied: list[str] = []
    for k, v in sd.items():
        if k in own:
            _copy(own[k], v, k, copied)
    if not copied:
        raise ValueError(f"image_pretrained {path}: no tensor matched the image tower")
    return copied


def apply_pretrained(model, cfg) -> list[str]:
    """Copy the local pretrained files ``cfg`` (``ModelConfig``) names into ``model``
    (``PretrainModel``): ``image_pretrained`` / ``text_pretrained`` as the module docstring says
    for the unified backbone; for ``dual_encoder``, every matching tensor into its timm image
    tower. Returns the names copied (none without pretrained files).

    The dual encoder's BERT text tower still loads ``text_pretrained`` in its constructor
    (``load_bert_into_bert``): ``BertModel.from_pretrained`` draws from the global RNG, so loading
    it here, after the projections and the fusion head were drawn, would change their random
    initialisation."""
    bb = model.backbone
    copied: list[str] = []
    if cfg.arch == "unified":
        if cfg.image_pretrained:
            copied += load_timm_vit(bb, cfg.image_pretrained)
        if cfg.text_pretrained:
            copied += load_bert(bb, cfg.text_pretrained)
        return copied
    if cfg.image_pretrained:
        if cfg.image_backbone == "small_cnn":
            raise ValueError("model.image_pretrained needs a timm image_backbone, not small_cnn")
        copied += load_timm_into_backbone(bb.image_tower.backbone, cfg.image_pretrained)
    return copied
