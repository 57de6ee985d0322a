"""Tower conversion: the parts of a ``PretrainModel`` that standard libraries can hold.

- ``export_text_tower``: ``text_encoder/``, a ``transformers`` ``BertModel`` directory.
- ``export_image_tower``: ``image_encoder/``, a ``timm`` model directory
  (``unified_timm_state`` maps the unified model's image path onto a timm ``VisionTransformer``).

Every tower is checked against the mmpretrain model on a probe batch (``TOWER_ATOL``) before it
is written; a mismatch is an ``ExportError``. What each tower holds: docs/evaluation.md and the
``mmpretrain.export.cli`` docstring.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mmpretrain.export.format import ExportError, load_state_strict

TOWER_ATOL = 1e-4


def _vit_name(width: int, depth: int, heads: int) -> str:
    """A registered timm ViT whose defaults the exported kwargs override (all of them are
    given explicitly, so the choice only affects the name in config.json)."""
    known = {(192, 12, 3): "vit_tiny_patch16_224", (384, 12, 6): "vit_small_patch16_224",
             (768, 12, 12): "vit_base_patch16_224", (1024, 24, 16): "vit_large_patch16_224"}
    return known.get((width, depth, heads), "vit_base_patch16_224")


def unified_timm_state(backbone) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(timm model name, kwargs, state dict) of the unified model's image path."""
    c = backbone.cfg
    kwargs = dict(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.width, depth=c.depth,
                  num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True, class_token=True,
                  num_classes=c.embed_dim, fc_norm=False)
    # mmpretrain pools the final-norm tokens: 'cls' = [CLS]; 'mean' = mean over all tokens, [CLS]
    # included (timm 'avg' with pool_include_prefix; fc_norm off so the final norm stays put)
    pool = getattr(c, "pool", "cls")
    if pool == "mean":
        kwargs.update(global_pool="avg", pool_include_prefix=True)
    elif pool == "cls":
        kwargs.update(global_pool="token")
    else:
        raise ExportError(f"model.pool={pool!r} has no timm equivalent")
    sd = {k: v.detach().float().clone() for k, v in backbone.state_dict().items()}
    ie = "image_embed."
    out = {
        "cls_token": sd[ie + "cls_token"],
        # the image modality-type embedding is added to every token: fold it into the positions
        "pos_embed": sd[ie + "pos_embed"] + sd[ie + "type_embed"],
        "patch_embed.proj.weight": sd[ie + "patch_embed.proj.weight"],
        "patch_embed.proj.bias": sd[ie + "patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
        "head.weight": sd["image_proj.proj.weight"],
        "head.bias": torch.zeros(c.embed_dim),
    }
    timm_block = ("norm1.", "attn.qkv.", "attn.proj.", "norm2.", "mlp.fc1.", "mlp.fc2.")
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            if rest.startswith(timm_block):  # image expert = the timm names; text/vl experts skipped
                out[f"blocks.{i}.{rest}"] = v
    return _vit_name(c.width, c.depth, c.num_heads), kwargs, out


def _save_timm(model, directory: Path, kwargs: dict) -> None:
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(directory), model_args=kwargs, safe_serialization=True)


def export_image_tower(backbone, directory: Path, probe_pixels: torch.Tensor) -> dict | None:
    """Write ``image_encoder/``; returns what it holds (for config.json) or None."""
    import timm

    arch = backbone.cfg.arch
    if arch == "unified":
        name, kwargs, sd = unified_timm_state(backbone)
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_state_strict(model, sd, "image_encoder (timm ViT)")
        model.eval()
        with torch.no_grad():
            want_tokens, want_emb = backbone.encode_image(probe_pixels)
            got_tokens = model.forward_features(probe_pixels)
            got_emb = F.normalize(model.forward_head(got_tokens).float(), dim=-1)
        _check_close("image_encoder forward_features vs encode_image tokens", got_tokens, want_tokens)
        _check_close("image_encoder embedding vs encode_image embedding", got_emb, want_emb)
        _save_timm(model, directory, kwargs)
        return {"library": "timm", "model_name": name, "kwargs": kwargs,
                "holds": "whole image path; F.normalize(model(x)) = image embedding"}
    backbone_mod = backbone.image_tower.backbone
    if backbone.cfg.image_backbone == "small_cnn":
        return None
    name = backbone.cfg.image_backbone
    kwargs = {"num_classes": 0}
    if "vit" in name or "deit" in name:  # as the dual encoder's ImageTower builds it
        kwargs["img_size"] = backbone.cfg.image_size
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_state_strict(model, {k: v.detach().float().clone() for k, v in backbone_mod.state_dict().items()},
                      "image_encoder (timm backbone)")
    model.eval()
    with torch.no_grad():
        _check_close("image_encoder forward_features vs image backbone",
                     model.forward_features(probe_pixels), backbone_mod.forward_features(probe_pixels))
    _save_timm(model, directory, kwargs)
    return {"library": "timm", "model_name": name, "kwargs": kwargs,
            "holds": "image backbone only (forward_features); projection and pooling stay in mmpretrain"}


def export_text_tower(backbone, directory: Path, probe_ids: torch.Tensor, probe_mask: torch.Tensor) -> dict:
    """Write ``text_encoder/`` (a transformers BertModel directory); returns what it holds."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    c = backbone.cfg
    if c.arch == "unified":
        te = backbone.text_embed
        bcfg = BertConfig(vocab_size=te.word_embeddings.num_embeddings, hidden_size=c.width, num_hidden_layers=0,
                          num_attention_heads=c.num_heads, intermediate_size=int(c.width * c.mlp_ratio),
                          max_position_embeddings=te.position_embeddings.num_embeddings, type_vocab_size=2,
                          layer_norm_eps=te.LayerNorm.eps, pad_token_id=0, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
        bert = BertModel(bcfg, add_pooling_layer=True)
        sd = {f"embeddings.{k}": v.detach().float().clone() for k, v in te.state_dict().items() if k != "type_embed"}
        # the text modality-type embedding is added after the LayerNorm: fold it into its bias
        sd["embeddings.LayerNorm.bias"] = sd["embeddings.LayerNorm.bias"] + te.type_embed.detach().float().reshape(-1)
        holds = ("embeddings only (0 layers): last_hidden_state = text_inputs (word + position + type "
                 "embeddings, LayerNorm, text modality type); the shared pre-LN stack is not representable")
    else:
        bert_src = backbone.text_tower
        bert = BertModel(bert_src.config, add_pooling_layer=True)
        sd = {k: v.detach().float().clone() for k, v in bert_src.state_dict().items()}
        save_file({"weight": backbone.text_proj.proj.weight.detach().float().contiguous()},
                  str(directory / "text_projection.safetensors"))
        pool = getattr(c, "pool", "cls")
        pooled = ("last_hidden_state[:, 0]" if pool == "cls" else
                  "mean of last_hidden_state over tokens with attention_mask 1")
        holds = (f"the whole text tower: last_hidden_state = text_inputs; text embedding = "
                 f"F.normalize(pooled @ text_projection.T), pooled = {pooled}")
    # BertModel's pooler is not part of mmpretrain: identity weights, so pooler_output = tanh([CLS])
    # is deterministic instead of randomly initialised on load.
    sd["pooler.dense.weight"] = torch.eye(c.width)
    sd["pooler.dense.bias"] = torch.zeros(c.width)
    load_state_strict(bert, sd, "text_encoder (BertModel)")
    bert.eval()
    with torch.no_grad():
        got = bert(input_ids=probe_ids, attention_mask=probe_mask).last_hidden_state
        ref = backbone.text_inputs(probe_ids, probe_mask)
    m = probe_mask.bool()
    _check_close("text_encoder last_hidden_state vs text_inputs", got[m], ref[m])
    bert.save_pretrained(str(directory), safe_serialization=True)
    return {"library": "transformers", "class": "BertModel", "num_hidden_layers": bert.config.num_hidden_layers,
            "pool": getattr(c, "pool", "cls"), "holds": holds}


def _check_close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise ExportError(f"export self-check failed: {what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = float((got - want).abs().max()) if got.numel() else 0.0
    if not err <= TOWER_ATOL * max(1.0, float(want.abs().max())):
        raise ExportError(f"export self-check failed: {what}: max abs difference {err:.3g}")
