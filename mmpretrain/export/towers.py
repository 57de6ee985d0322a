"""Tower conversion: the parts of a ``PretrainModel`` that standard libraries hold exactly.

- ``export_text_tower``: ``text_encoder/``, a ``transformers`` model directory whose
  ``last_hidden_state`` equals the text tokens of ``encode_text``: a ``RobertaPreLayerNormModel``
  for the unified model (pre-LayerNorm like our stack; with VLMo experts the blocks take the text
  experts), the ``BertModel`` text tower itself for the dual encoder. Pooling and projection are
  returned for the sentence-transformers layout (``mmpretrain.export.st``) and written as
  ``text_projection.safetensors``.
- ``export_image_tower``: ``image_encoder/``, a ``timm`` directory whose ``pretrained_cfg`` is the
  run's preprocessing (input size, mean/std, bicubic, crop_pct 1.0, center crop) and whose
  ``model_args`` carry no ``num_classes`` (so ``transformers.AutoModel`` / TimmWrapper loads it).
  ``unified_timm_state`` maps the unified image path onto a timm ``VisionTransformer``; for the
  dual encoder the timm backbone gets the tower projection folded into its head. ``small_cnn``
  has no timm form: ``export_small_cnn`` writes it as an exact ``transformers``
  ``PoolFormerForImageClassification`` (``small_cnn_poolformer``; docs/export.md).

Every tower is checked against the mmpretrain model on a probe batch (``TOWER_ATOL``) before it
is written; a mismatch is an ``ExportError``.

Two exactness details (see docs/evaluation.md):
- transformers' pre-LN classes have one ``layer_norm_eps``; our text embedding LayerNorm uses
  1e-12 and the blocks 1e-6. LayerNorm is scale invariant except for eps
  (``LN(s x; eps) = LN(x; eps / s^2)``), so the word/position/token-type tables are stored scaled
  by ``s = sqrt(1e-6 / 1e-12) = 1000`` and every LayerNorm uses 1e-6: the same function.
- RoBERTa numbers positions from ``pad_token_id + 1``: the position table is shifted one row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mmpretrain.export.format import ExportError, load_state_strict

TOWER_ATOL = 1e-4


class NoStandardForm(Exception):
    """This part of the model has no exact form in the target library; the message says why (one
    line). The export leaves the part out and records the reason."""
BLOCK_EPS = 1e-6  # layers.Block / the final norm


def _clone(sd: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone().contiguous() for k, v in sd.items()}


def _vit_name(width: int, depth: int, heads: int) -> str:
    """A registered timm ViT whose defaults the exported kwargs override (all of them are
    given explicitly, so the choice only affects the name in config.json)."""
    known = {(192, 12, 3): "vit_tiny_patch16_224", (384, 12, 6): "vit_small_patch16_224",
             (768, 12, 12): "vit_base_patch16_224", (1024, 24, 16): "vit_large_patch16_224"}
    return known.get((width, depth, heads), "vit_base_patch16_224")


HYBRID_VIT = "vit_tiny_r_s16_p8_224"  # model.image_stem='resnet': the stem, then a patch_size/4 projection
HYBRID_FIRST_CONV = "patch_embed.backbone.conv"


def unified_timm_state(backbone) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(timm model name, kwargs, state dict) of the unified model's image path."""
    c = backbone.cfg
    kwargs = dict(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.width, depth=c.depth,
                  num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True, class_token=True,
                  num_classes=c.embed_dim, fc_norm=False)
    # mmpretrain pools the final-norm tokens: 'cls' = [CLS]; 'mean' = mean over all tokens, [CLS]
    # included (timm 'avg' with pool_include_prefix; fc_norm off so the final norm stays put)
    # image_pool 'max': the channel-wise max over all tokens (timm 'max' with pool_include_prefix)
    pool = getattr(c, "pool", "cls")
    if getattr(c, "image_pool", "same") != "same":
        pool = c.image_pool
    if pool == "mean":
        kwargs.update(global_pool="avg", pool_include_prefix=True)
    elif pool == "max":
        kwargs.update(global_pool="max", pool_include_prefix=True)
    elif pool == "cls":
        kwargs.update(global_pool="token")
    else:
        raise ExportError(f"model.pool={pool!r} has no timm equivalent")
    sd = _clone(backbone.state_dict())
    ie = "image_embed."
    out = {
        "cls_token": sd[ie + "cls_token"],
        # the image modality-type embedding is added to every token: fold it into the positions
        "pos_embed": sd[ie + "pos_embed"] + sd[ie + "type_embed"],
        # patch stem: proj.*; resnet stem: backbone.conv / backbone.norm / proj (timm's hybrid names)
        **{k[len(ie):]: v for k, v in sd.items() if k.startswith(ie + "patch_embed.")},
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
    if getattr(c, "image_stem", "patch") == "resnet":
        # timm's R+ViT hybrid with the ResNetV2 stem only (layers=()), our sizes given explicitly
        return HYBRID_VIT, dict(kwargs, patch_size=c.patch_size // 4), out
    return _vit_name(c.width, c.depth, c.num_heads), kwargs, out


def timm_pretrained_cfg(preprocessing: dict, num_classes: int, classifier: str, first_conv: str,
                        fixed_input_size: bool = True) -> dict:
    """The run's eval preprocessing as a timm ``pretrained_cfg``: ``resolve_data_config`` +
    ``create_transform`` then give shorter side -> image_size (bicubic), center crop,
    ``(x/255 - mean) / std`` — our eval pixels exactly, square or not
    (``mmpretrain.data.transforms.resize_center_crop`` is that geometry)."""
    s = int(preprocessing["image_size"])
    return {"input_size": [3, s, s], "fixed_input_size": bool(fixed_input_size), "interpolation": "bicubic", "crop_pct": 1.0,
            "crop_mode": "center", "mean": [float(x) for x in preprocessing["mean"]],
            "std": [float(x) for x in preprocessing["std"]], "num_classes": int(num_classes),
            "pool_size": None, "first_conv": first_conv, "classifier": classifier, "custom_load": False,
            "tag": "mmpretrain", "license": "other",
            "description": "image tower of an mmpretrain export (not an ImageNet classifier)"}


def _save_timm(model, directory: Path, name: str, kwargs: dict, preprocessing: dict) -> None:
    """timm ``save_for_hf`` layout with our own config.json: ``model_args`` without
    ``num_classes`` (TimmWrapper passes its own) and ``pretrained_cfg`` = the run's preprocessing
    (not the one of the registered name)."""
    from timm.models._hub import save_for_hf

    args = {k: v for k, v in kwargs.items() if k != "num_classes"}
    save_for_hf(model, str(directory), model_args=args, safe_serialization=True)
    cfg_path = directory / "config.json"
    written = json.loads(cfg_path.read_text())
    wcfg = written["pretrained_cfg"]
    if name == HYBRID_VIT:  # the registered cfg names a stem.conv our stem-only backbone does not have
        wcfg["first_conv"] = HYBRID_FIRST_CONV
    model_args = {k: v for k, v in written.get("model_args", args).items() if k != "num_classes"}
    num_classes = int(model.num_classes)
    config = {"architecture": name, "num_classes": num_classes, "num_features": int(model.num_features),
              "global_pool": written.get("global_pool", kwargs.get("global_pool", "")),
              "model_args": model_args,
              "pretrained_cfg": timm_pretrained_cfg(preprocessing, num_classes, wcfg.get("classifier", "head"),
                                                    wcfg.get("first_conv", ""), wcfg.get("fixed_input_size", False))}
    if not config["global_pool"]:
        config.pop("global_pool")
    cfg_path.write_text(json.dumps(config, indent=2) + "\n")


def export_image_tower(backbone, directory: Path, probe_pixels: torch.Tensor,
                       preprocessing: dict | None = None) -> dict:
    """Write ``image_encoder/``; returns what it holds (for config.json), or raises
    ``NoStandardForm`` when the image tower has no exact standard form. The returned dict carries
    ``library`` ("timm", or "transformers" for ``small_cnn``) and ``_projection`` (weight, bias)
    for the sentence-transformers layout, embedding = normalize(Dense(pooled features)) over
    ``_features`` features; ``_st`` (``small_cnn``) says which output the route reads and that it
    is mean-pooled first (default: ``pooler_output``, no pooling module)."""
    import timm

    preprocessing = preprocessing or {"image_size": backbone.cfg.image_size, "mean": [0.485, 0.456, 0.406],
                                      "std": [0.229, 0.224, 0.225]}
    c = backbone.cfg
    if c.arch == "unified":
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
        _save_timm(model, directory, name, kwargs, preprocessing)
        return {"library": "timm", "model_name": name, "kwargs": {k: v for k, v in kwargs.items() if k != "num_classes"},
                "num_classes": c.embed_dim, "pool": c.pool,
                "holds": "whole image path; F.normalize(model(x)) = image embedding (head = projection)",
                "_projection": (sd["head.weight"], None), "_features": c.width}
    if getattr(c, "image_pool", "same") == "max":
        raise NoStandardForm("model.image_pool='max' on a dual encoder: the max is taken after the tower's "
                             "projection (with bias), which no pooled standard head reproduces")
    if c.image_backbone == "small_cnn":
        return export_small_cnn(backbone, directory, probe_pixels, preprocessing)
    src = backbone.image_tower.backbone
    name = c.image_backbone
    base = {"img_size": c.image_size} if ("vit" in name or "deit" in name) else {}
    # the tower's projection and image_proj are linear and commute with the mean over tokens:
    # fold both into timm's head over timm's average pool
    w_tower, b_tower = backbone.image_tower.proj.weight.detach().float(), backbone.image_tower.proj.bias.detach().float()
    w_img = backbone.image_proj.proj.weight.detach().float()
    head_w, head_b = w_img @ w_tower, w_img @ b_tower
    for extra in ({"global_pool": "avg"}, {"global_pool": "avg", "pool_include_prefix": True, "fc_norm": False}):
        kwargs = dict(base, num_classes=c.embed_dim, **extra)
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError:
            continue
        sd = _clone(src.state_dict())
        cls_name = model.pretrained_cfg.get("classifier", "head")
        sd[f"{cls_name}.weight"], sd[f"{cls_name}.bias"] = head_w, head_b
        try:
            load_state_strict(model, sd, "image_encoder (timm backbone)")
        except ExportError:
            continue
        model.eval()
        with torch.no_grad():
            got_emb = F.normalize(model(probe_pixels).float(), dim=-1)
            want_emb = backbone.encode_image(probe_pixels)[1]
            ok_feat = torch.allclose(model.forward_features(probe_pixels), src.forward_features(probe_pixels),
                                     atol=TOWER_ATOL, rtol=0)
        if ok_feat and float((got_emb - want_emb).abs().max()) <= TOWER_ATOL:
            _save_timm(model, directory, name, kwargs, preprocessing)
            return {"library": "timm", "model_name": name, "kwargs": {k: v for k, v in kwargs.items() if k != "num_classes"},
                    "num_classes": c.embed_dim, "pool": "mean",
                    "holds": "image tower with the projection folded into the head; "
                             "F.normalize(model(x)) = image embedding",
                    "_projection": (head_w, head_b), "_features": int(model.num_features)}
    raise NoStandardForm(f"timm {name!r} with an average-pool head does not reproduce the dual encoder's image "
                         "tower (its feature layout or pooling differs); embed_images needs load_pretrained")


# ----------------------------------------------------------------------------- small_cnn

SMALL_CNN_NO_TIMM = ("model.image_backbone='small_cnn' has no timm form: no timm architecture stacks 3x3 stride-2 "
                     "convs with biases, each followed by a non-residual GroupNorm(1) + GELU (timm's MetaFormer/"
                     "PoolFormer fixes a 7x7 stride-4 stem, its convolutional stems have no bias); image_encoder/ "
                     "is a transformers PoolFormerForImageClassification instead (a timm image_backbone such as "
                     "test_efficientnet_gn exports to timm)")
def small_cnn_poolformer(backbone, preprocessing: dict):
    """(PoolFormerConfig, state dict) of ``transformers.PoolFormerForImageClassification`` that
    computes the ``small_cnn`` dual-encoder image embedding: ``F.normalize(logits)`` =
    ``encode_image(pixels)[1]``.

    ``small_cnn`` is 4 x (3x3 stride-2 conv with bias -> GroupNorm(1) -> GELU), tokens = the final
    map, embedding = normalize(W_img (W_tower mean(tokens) + b_tower)). PoolFormer's stages are a
    3x3 stride-2 conv with bias (``patch_sizes``/``strides``/``padding`` per stage) followed by a
    residual layer ``x + ls1 * (pool(GN(x)) - GN(x))``, then ``x + ls2 * conv2(GELU(conv1(GN(x))))``.
    Each stage holds two copies ``[h; h]`` of our conv output ``h`` (GroupNorm(1) over the copies
    has the same mean and variance, so ``GN([h; h]) = [GN(h); GN(h)]``); ``ls1 = 0`` drops the
    pooling branch, ``conv1``/``conv2`` select the first copy, so the layer gives
    ``[h + GELU(GN(h)); h]`` and the next stage's conv, with weights ``[W, -W]``, sees exactly
    ``GELU(GN(h))``. A 1x1 fifth stage applies the folded projection and bias as ``[v; -v]``
    (``v = P y + c`` per position; its layer is the identity, ``ls1 = ls2 = 0``); the classifier's
    GroupNorm(1) of ``[v; -v]`` has mean 0 and only rescales, the spatial mean gives mean(v), and
    the classifier keeps the first copy: ``logits = (P mean(y) + c) / s`` with a per-image
    ``s > 0``, which the L2 normalisation removes."""
    from transformers import PoolFormerConfig

    net = backbone.image_tower.backbone.net
    convs, norms = [net[3 * i] for i in range(4)], [net[3 * i + 1] for i in range(4)]
    chans = [int(conv.out_channels) for conv in convs]
    f = lambda t: t.detach().float().clone()  # noqa: E731
    w_img = f(backbone.image_proj.proj.weight)
    head_w, head_b = w_img @ f(backbone.image_tower.proj.weight), w_img @ f(backbone.image_tower.proj.bias)
    emb = int(head_w.shape[0])
    pcfg = PoolFormerConfig(
        num_channels=3, num_encoder_blocks=5, depths=[1] * 5, hidden_sizes=[2 * ch for ch in chans] + [2 * emb],
        patch_sizes=[3, 3, 3, 3, 1], strides=[2, 2, 2, 2, 1], padding=[1, 1, 1, 1, 0], pool_size=3, mlp_ratio=0.5,
        hidden_act="gelu", hidden_dropout_prob=0.0, drop_path_rate=0.0, use_layer_scale=True,
        layer_scale_init_value=1.0, num_labels=emb,
        id2label={i: f"dim_{i}" for i in range(emb)}, label2id={f"dim_{i}": i for i in range(emb)})
    sd: dict[str, torch.Tensor] = {}
    enc = "poolformer.encoder."
    for i, (conv, norm) in enumerate(zip(convs, norms)):
        w, b = f(conv.weight), f(conv.bias)
        if i:  # the previous stage holds [h + GELU(GN(h)); h]: [W, -W] reads GELU(GN(h))
            w = torch.cat([w, -w], 1)
        sd[f"{enc}patch_embeddings.{i}.projection.weight"] = torch.cat([w, w], 0)
        sd[f"{enc}patch_embeddings.{i}.projection.bias"] = torch.cat([b, b])
        ch = chans[i]
        eye, zero = torch.eye(ch)[:, :, None, None], torch.zeros(ch, ch, 1, 1)
        layer = f"{enc}block.{i}.0."
        sd.update({layer + "before_norm.weight": torch.ones(2 * ch), layer + "before_norm.bias": torch.zeros(2 * ch),
                   layer + "after_norm.weight": torch.cat([f(norm.weight)] * 2),
                   layer + "after_norm.bias": torch.cat([f(norm.bias)] * 2),
                   layer + "output.conv1.weight": torch.cat([eye, zero], 1), layer + "output.conv1.bias": torch.zeros(ch),
                   layer + "output.conv2.weight": torch.cat([eye, zero], 0),
                   layer + "output.conv2.bias": torch.zeros(2 * ch),
                   layer + "layer_scale_1": torch.zeros(2 * ch), layer + "layer_scale_2": torch.ones(2 * ch)})
    pk = torch.cat([head_w, -head_w], 1)[:, :, None, None]
    sd[f"{enc}patch_embeddings.4.projection.weight"] = torch.cat([pk, -pk], 0)
    sd[f"{enc}patch_embeddings.4.projection.bias"] = torch.cat([head_b, -head_b])
    layer = f"{enc}block.4.0."
    sd.update({layer + "before_norm.weight": torch.ones(2 * emb), layer + "before_norm.bias": torch.zeros(2 * emb),
               layer + "after_norm.weight": torch.ones(2 * emb), layer + "after_norm.bias": torch.zeros(2 * emb),
               layer + "output.conv1.weight": torch.zeros(emb, 2 * emb, 1, 1), layer + "output.conv1.bias": torch.zeros(emb),
               layer + "output.conv2.weight": torch.zeros(2 * emb, emb, 1, 1),
               layer + "output.conv2.bias": torch.zeros(2 * emb),
               layer + "layer_scale_1": torch.zeros(2 * emb), layer + "layer_scale_2": torch.zeros(2 * emb)})
    sd.update({"norm.weight": torch.ones(2 * emb), "norm.bias": torch.zeros(2 * emb),
               "classifier.weight": torch.cat([torch.eye(emb), torch.zeros(emb, emb)], 1),
               "classifier.bias": torch.zeros(emb)})
    return pcfg, sd


def export_small_cnn(backbone, directory: Path, probe_pixels: torch.Tensor, preprocessing: dict) -> dict:
    """Write ``image_encoder/`` for ``small_cnn`` as ``transformers.PoolFormerForImageClassification``
    (``small_cnn_poolformer``), after checking its embedding against ``encode_image``; its
    ``config.json`` also carries the run's preprocessing as a timm ``pretrained_cfg`` and names
    ``TimmWrapperImageProcessor`` as its ``image_processor_type``, so ``AutoImageProcessor`` is
    timm's transform of that ``pretrained_cfg``: our eval pixels exactly.

    The sentence-transformers image route reads the same directory through ``AutoModel``
    (``PoolFormerModel``): its ``last_hidden_state`` is the last stage's ``[v; -v]`` map, which
    sentence-transformers flattens to tokens; the mean over them is ``[mean v; -mean v]`` and a
    Dense keeping the first half gives ``mean v`` = the unnormalised embedding (``_st``)."""
    from transformers import PoolFormerForImageClassification

    pcfg, sd = small_cnn_poolformer(backbone, preprocessing)
    model = PoolFormerForImageClassification(pcfg)
    load_state_strict(model, sd, "image_encoder (PoolFormerForImageClassification)")
    model.eval()
    with torch.no_grad():
        got = F.normalize(model(pixel_values=probe_pixels).logits.float(), dim=-1)
        want = backbone.encode_image(probe_pixels)[1]
    _check_close("image_encoder PoolFormerForImageClassification normalize(logits) vs encode_image embedding",
                 got, want)
    model.config.pretrained_cfg = timm_pretrained_cfg(preprocessing, pcfg.num_labels, "classifier",
                                                      "poolformer.encoder.patch_embeddings.0.projection")
    # AutoImageProcessor reads config.json when it holds a pretrained_cfg (transformers'
    # is_timm_local_checkpoint); this key makes it timm's transform of that pretrained_cfg
    model.config.image_processor_type = "TimmWrapperImageProcessor"
    model.save_pretrained(str(directory), safe_serialization=True)
    emb = pcfg.num_labels
    return {"library": "transformers", "class": "PoolFormerForImageClassification", "num_classes": pcfg.num_labels,
            "pool": "mean",
            "holds": "small_cnn as PoolFormer (each stage two copies of the conv output, layer scales 0/1 that make "
                     "every layer GroupNorm(1) + GELU) with the projection folded into a 1x1 last stage; "
                     "F.normalize(AutoModelForImageClassification(...)(pixel_values).logits) = image embedding",
            "_projection": (torch.cat([torch.eye(emb), torch.zeros(emb, emb)], 1), None), "_features": 2 * emb,
            "_st": {"method_output_name": "last_hidden_state", "pooling": "mean"}}


# ----------------------------------------------------------------------------- text


def split_qkv(sd: dict, block: str, prefix: str, width: int) -> dict:
    """Our fused ``{block}attn.qkv`` as the separate ``{prefix}query/key/value`` weights and
    biases of the transformers attention layers (BERT/RoBERTa ``attention.self.``, ViLT
    ``attention.attention.``)."""
    qkv_w, qkv_b = sd[block + "attn.qkv.weight"], sd[block + "attn.qkv.bias"]
    out = {}
    for j, n in enumerate(("query", "key", "value")):
        out[f"{prefix}{n}.weight"] = qkv_w[j * width:(j + 1) * width].clone()
        out[f"{prefix}{n}.bias"] = qkv_b[j * width:(j + 1) * width].clone()
    return out

def _roberta_prelayernorm(backbone, pad_token_id: int = 0):
    """(RobertaPreLayerNormConfig, state dict) of the unified model's text path. RoBERTa numbers
    the positions of non-padding tokens from ``pad_token_id + 1``: our table is stored there."""
    from transformers import RobertaPreLayerNormConfig

    c = backbone.cfg
    te = backbone.text_embed
    scale = math.sqrt(BLOCK_EPS / te.LayerNorm.eps)  # see the module docstring
    n_pos = te.position_embeddings.num_embeddings
    rcfg = RobertaPreLayerNormConfig(
        vocab_size=te.word_embeddings.num_embeddings, hidden_size=c.width, num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads, intermediate_size=int(c.width * c.mlp_ratio), hidden_act="gelu",
        max_position_embeddings=n_pos + pad_token_id + 1, type_vocab_size=2, layer_norm_eps=BLOCK_EPS,
        pad_token_id=pad_token_id,
        bos_token_id=None, eos_token_id=None, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        position_embedding_type="absolute")
    sd = _clone(backbone.state_dict())
    pos = torch.zeros(n_pos + pad_token_id + 1, c.width)
    pos[pad_token_id + 1:] = sd["text_embed.position_embeddings.weight"] * scale  # RoBERTa: from pad_id + 1
    out = {"embeddings.word_embeddings.weight": sd["text_embed.word_embeddings.weight"] * scale,
           "embeddings.position_embeddings.weight": pos,
           "embeddings.token_type_embeddings.weight": sd["text_embed.token_type_embeddings.weight"] * scale,
           "embeddings.LayerNorm.weight": sd["text_embed.LayerNorm.weight"],
           # the text modality-type embedding is added after the LayerNorm: fold it into its bias
           "embeddings.LayerNorm.bias": sd["text_embed.LayerNorm.bias"] + sd["text_embed.type_embed"].reshape(-1),
           "LayerNorm.weight": sd["norm.weight"], "LayerNorm.bias": sd["norm.bias"],
           "pooler.dense.weight": torch.eye(c.width), "pooler.dense.bias": torch.zeros(c.width)}
    norm2, mlp = ("norm2_text", "mlp_text") if c.modality_experts else ("norm2", "mlp")
    w = c.width
    for i in range(c.depth):
        b, p = f"blocks.{i}.", f"encoder.layer.{i}."
        out.update(split_qkv(sd, b, p + "attention.self.", w))
        out.update({p + "attention.LayerNorm.weight": sd[b + "norm1.weight"],
                    p + "attention.LayerNorm.bias": sd[b + "norm1.bias"],
                    p + "attention.output.dense.weight": sd[b + "attn.proj.weight"],
                    p + "attention.output.dense.bias": sd[b + "attn.proj.bias"],
                    p + "intermediate.LayerNorm.weight": sd[b + f"{norm2}.weight"],
                    p + "intermediate.LayerNorm.bias": sd[b + f"{norm2}.bias"],
                    p + "intermediate.dense.weight": sd[b + f"{mlp}.fc1.weight"],
                    p + "intermediate.dense.bias": sd[b + f"{mlp}.fc1.bias"],
                    p + "output.dense.weight": sd[b + f"{mlp}.fc2.weight"],
                    p + "output.dense.bias": sd[b + f"{mlp}.fc2.bias"]})
    return rcfg, out


def export_text_tower(backbone, directory: Path, probe_ids: torch.Tensor, probe_mask: torch.Tensor,
                      pad_token_id: int = 0) -> dict:
    """Write ``text_encoder/`` (a transformers model directory) and ``text_projection.safetensors``;
    returns what it holds (``_projection``: the projection weight for sentence-transformers)."""
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    c = backbone.cfg
    if c.arch == "unified":
        from transformers import RobertaPreLayerNormModel

        rcfg, sd = _roberta_prelayernorm(backbone, int(pad_token_id))
        model = RobertaPreLayerNormModel(rcfg, add_pooling_layer=True)
        load_state_strict(model, sd, "text_encoder (RobertaPreLayerNormModel)")
        holds = ("the whole text path (embeddings, every block" + (" with its text expert" if c.modality_experts else "")
                 + ", the final norm): last_hidden_state = encode_text tokens")
    else:
        from transformers import BertModel

        bert_src = backbone.text_tower
        model = BertModel(bert_src.config, add_pooling_layer=True)
        sd = _clone(bert_src.state_dict())
        # BertModel's pooler is not part of mmpretrain: identity weights, so pooler_output = tanh([CLS])
        sd["pooler.dense.weight"], sd["pooler.dense.bias"] = torch.eye(c.width), torch.zeros(c.width)
        load_state_strict(model, sd, "text_encoder (BertModel)")
        holds = "the whole text tower: last_hidden_state = encode_text tokens"
    model.eval()
    with torch.no_grad():
        got = model(input_ids=probe_ids, attention_mask=probe_mask).last_hidden_state
        ref_tokens, ref_emb = backbone.encode_text(probe_ids, probe_mask)
    m = probe_mask.bool()
    _check_close(f"text_encoder last_hidden_state vs encode_text tokens", got[m], ref_tokens[m])
    proj = backbone.text_proj.proj.weight.detach().float().contiguous().clone()
    pool = getattr(c, "pool", "cls")
    mf = probe_mask.unsqueeze(-1).float()
    pooled = got[:, 0] if pool == "cls" else (got * mf).sum(1) / mf.sum(1).clamp(min=1.0)
    _check_close("text_encoder pooled + projected vs encode_text embedding", F.normalize(pooled @ proj.t(), dim=-1), ref_emb)
    model.save_pretrained(str(directory), safe_serialization=True)
    save_file({"weight": proj}, str(directory / "text_projection.safetensors"))
    pooled_txt = ("last_hidden_state[:, 0]" if pool == "cls" else
                  "mean of last_hidden_state over tokens with attention_mask 1")
    return {"library": "transformers", "class": type(model).__name__, "num_hidden_layers": c.depth,
            "pool": pool, "holds": holds + f"; text embedding = F.normalize(pooled @ text_projection.T), "
                                          f"pooled = {pooled_txt}",
            "_projection": (proj, None), "_features": c.width}


def _check_close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise ExportError(f"export self-check failed: {what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = float((got - want).abs().max()) if got.numel() else 0.0
    if not err <= TOWER_ATOL * max(1.0, float(want.abs().max())):
        raise ExportError(f"export self-check failed: {what}: max abs difference {err:.3g}")
