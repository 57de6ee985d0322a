"""`mmpretrain export`: a training checkpoint -> a directory that standard libraries load.

    mmpretrain export --checkpoint runs/x/checkpoints/step_00000200 --out exports/x [--force]

Reads any checkpoint the trainer writes (docs/ARCHITECTURE.md): ``model.safetensors`` (one
process, DDP) or DeepSpeed ZeRO-2/3 partitions under ``pytorch_model/``, consolidated to fp32
with ``deepspeed.utils.zero_to_fp32``. Writes::

    OUT/model.safetensors       the whole PretrainModel (fp32), loaded by load_pretrained()
    OUT/config.json             {"format": "mmpretrain-export/1", "arch", "model": config_dict(), ...}
    OUT/preprocessing.json      image_size, mean, std, max_length, resize rule
    OUT/tokenizer.json, ...     the run's tokenizer (AutoTokenizer.from_pretrained(OUT))
    OUT/text_encoder/           transformers BertModel (AutoModel.from_pretrained)
    OUT/image_encoder/          timm model (timm.create_model("local-dir:OUT/image_encoder", pretrained=True))

What the towers hold (see docs/evaluation.md for the full table):
- ``unified``: ``image_encoder`` is a timm ``VisionTransformer`` holding the whole image path —
  patch embedding, [CLS], position embedding (+ the image modality-type embedding folded in),
  every shared block with its image FFN, the final norm, timm's pooling set to ``model.pool``
  (mean over all tokens incl. [CLS], or [CLS]) and the image projection as ``head`` (bias 0):
  ``forward_features`` = ``encode_image`` tokens, ``F.normalize(model(x))`` = the image
  embedding. ``text_encoder`` is a ``BertModel`` with **0 layers**: its embeddings (with the text
  modality-type embedding folded into the LayerNorm bias) equal ``text_inputs``. The shared
  stack is pre-LayerNorm; BERT layers are post-LayerNorm and cannot hold it, so the text
  embedding itself needs ``load_pretrained``.
- ``dual_encoder``: ``text_encoder`` is the text tower itself (a BertModel, exact) plus
  ``text_projection.safetensors`` (embedding = normalised projection of the masked mean of
  ``last_hidden_state``, or of [CLS] with ``model.pool=cls``); ``image_encoder`` is the timm backbone (``num_classes=0``)
  when ``model.image_backbone`` is a timm model (not written for ``small_cnn``).
Every tower is checked against the mmpretrain model on a random batch before the export is
published; a mismatch fails the export.

Errors (not a checkpoint, weights that do not fit the recorded architecture, a truncated
safetensors file, an existing output) print one line and exit 2. The export is written to
``OUT.tmp`` and renamed at the end, so ``OUT`` is either complete or absent (``--force``
replaces an existing export only once the new one is complete).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mmpretrain.trainer.checkpoint import META_FILE, MODEL_KEYS, CheckpointError, read_meta

FORMAT = "mmpretrain-export/1"
CKPT_META = META_FILE
TOWER_ATOL = 1e-4


class ExportError(ValueError):
    """Bad input for export/eval; the message is one line meant for the user."""


# ----------------------------------------------------------------------------- reading checkpoints

def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise several types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{path}: unreadable safetensors file (truncated or corrupt?): {msg}") from None


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, full fp32 state dict) of a trainer checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: not a checkpoint directory (does not exist or is a file)")
    if not (path / CKPT_META).is_file():
        raise ExportError(f"{path}: not an mmpretrain checkpoint (no {CKPT_META}; an incomplete or foreign directory)")
    try:
        meta = read_meta(path, required=MODEL_KEYS)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if (path / "model.safetensors").is_file():
        sd = _load_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model").is_dir():
        sd = _consolidate_zero(path)
    elif (path / "pytorch_model.bin").is_file():
        try:
            sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{path / 'pytorch_model.bin'}: unreadable ({type(e).__name__})") from None
    else:
        raise ExportError(f"{path}: no model weights (expected model.safetensors or DeepSpeed pytorch_model/)")
    return meta, _strip_prefixes(sd)


def _consolidate_zero(path: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from DeepSpeed ZeRO-2/3 partitions (any world size) via zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sink = io.StringIO()  # zero_to_fp32 prints progress lines; keep the command's output clean
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
    except Exception as e:  # noqa: BLE001 - missing/truncated partition files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{path / 'pytorch_model'}: cannot consolidate the DeepSpeed ZeRO partitions: {msg}") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _config_tree(meta: dict):
    from mmpretrain.config import ConfigError, config_from_dict

    try:
        return config_from_dict(meta["config"])
    except ConfigError as e:
        raise ExportError(f"checkpoint config does not parse with this version of mmpretrain: {e}") from None


def load_state_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load ``sd`` into ``model``; any missing/unexpected key or shape difference is an
    ``ExportError`` naming the first one (weights from another architecture or config)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shapes:
        first = (f"shape of '{shapes[0]}' is {tuple(sd[shapes[0]].shape)}, the config gives "
                 f"{tuple(own[shapes[0]].shape)}" if shapes else
                 f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'")
        raise ExportError(f"{where}: weights do not match the architecture in its config "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape "
                          f"mismatches; {first})")
    model.load_state_dict(sd, strict=True)


def _load_tokenizer(directory: Path, cfg=None):
    from transformers import AutoTokenizer

    if (directory / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(directory))
    if cfg is not None:
        from mmpretrain.data.tokenizer import load_tokenizer

        return load_tokenizer(cfg.data.tokenizer, cfg.data.val_shards, cfg.data.vocab_size)
    raise ExportError(f"{directory}: no tokenizer files")


class Loaded:
    """A model rebuilt from a checkpoint or an export, with what evaluation needs."""

    def __init__(self, model, cfg, tokenizer, step: int, meta: dict, source: Path):
        self.model, self.cfg, self.tokenizer, self.step, self.meta, self.source = (
            model, cfg, tokenizer, step, meta, source)


def load_checkpoint(path: str | Path, allow_export: bool = True) -> Loaded:
    """Rebuild the model of a trainer checkpoint (or, with ``allow_export``, an export
    directory) on the CPU, in eval mode, with its full config and tokenizer."""
    from mmpretrain.models import build_model

    path = Path(path)
    if allow_export and (path / "config.json").is_file() and not (path / CKPT_META).is_file():
        return _load_export_as_checkpoint(path)
    meta, sd = read_checkpoint(path)
    cfg = _config_tree(meta)
    cfg.model.image_pretrained, cfg.model.text_pretrained = "", ""  # weights come from the checkpoint
    try:
        model = build_model(cfg.model, cfg.loss, int(meta["vocab_size"]))
    except (ValueError, TypeError) as e:
        raise ExportError(f"{path}: cannot build the model its config describes: {e}") from None
    load_state_strict(model, sd, str(path))
    model.eval()
    tok_dir = path / "tokenizer"
    tokenizer = _load_tokenizer(tok_dir, cfg if not tok_dir.is_dir() else None)
    return Loaded(model, cfg, tokenizer, int(meta.get("step", 0)), meta, path)


def _load_export_as_checkpoint(path: Path) -> Loaded:
    from mmpretrain.config import Config

    p = load_pretrained(path)
    cfg = Config(model=p.model.model_cfg, loss=p.model.loss_cfg)
    cfg.data.image_size = p.preprocessing["image_size"]
    cfg.data.mean, cfg.data.std = list(p.preprocessing["mean"]), list(p.preprocessing["std"])
    cfg.data.max_length = p.preprocessing["max_length"]
    cfg.data.tokenizer = str(path)
    return Loaded(p.model, cfg, p.tokenizer, int(p.config.get("step", 0)), p.config, path)


# ----------------------------------------------------------------------------- tower exports

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


# ----------------------------------------------------------------------------- export

def _preprocessing(cfg) -> dict:
    return {"image_size": int(cfg.data.image_size), "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "max_length": int(cfg.data.max_length),
            "resize": "shorter side to image_size (bicubic), center crop; pixels/255, then (x - mean) / std",
            "tokenizer": "padding='max_length', truncation, max_length"}


def export_checkpoint(ckpt: str | Path, out: str | Path, force: bool = False) -> Path:
    """Export checkpoint ``ckpt`` to directory ``out`` (atomic: ``out.tmp`` then rename)."""
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it (the old export stays until the new one is complete)")
    loaded = load_checkpoint(ckpt, allow_export=False)
    model, cfg = loaded.model, loaded.cfg
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        from safetensors.torch import save_file

        sd = {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.detach().contiguous().clone()
              for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        loaded.tokenizer.save_pretrained(str(tmp))
        (tmp / "preprocessing.json").write_text(json.dumps(_preprocessing(cfg), indent=2) + "\n")
        gen = torch.Generator().manual_seed(0)
        s = cfg.model.image_size
        probe_pixels = torch.randn(2, 3, s, s, generator=gen)
        tok = _tokenize(loaded.tokenizer, ["a red circle left of a blue square", "two green stars"],
                        cfg.data.max_length)
        backbone = model.backbone
        towers = {}
        (tmp / "text_encoder").mkdir()
        towers["text_encoder"] = export_text_tower(backbone, tmp / "text_encoder", tok["input_ids"], tok["attention_mask"])
        (tmp / "image_encoder").mkdir()
        image = export_image_tower(backbone, tmp / "image_encoder", probe_pixels)
        if image is None:
            (tmp / "image_encoder").rmdir()
        else:
            towers["image_encoder"] = image
        config = {"format": FORMAT, "arch": cfg.model.arch, "model": model.config_dict(),
                  "step": loaded.step, "source_checkpoint": str(ckpt),
                  "source_distributed_type": loaded.meta.get("distributed_type"),
                  "source_zero_stage": loaded.meta.get("zero_stage"), "towers": towers}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # written last
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- inference

def _tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    from mmpretrain.data.tokenizer import tokenize

    return tokenize(tokenizer, list(texts), max_length)


class Pretrained:
    """Inference on an exported model: no trainer, optimizer or GPU needed.

    - ``embed_images(images)``: PIL images (resized/cropped as in evaluation) or tensors
      (uint8 ``[3, H, W]``/``[B, 3, H, W]`` at the model's size, or already-normalised floats)
      -> L2-normalised ``[B, E]``.
    - ``embed_texts(texts)`` -> L2-normalised ``[B, E]``.
    - ``score_pairs(images, texts)`` -> ITM match probability ``[B]`` of each (image i, text i).
    """

    def __init__(self, model, tokenizer, config: dict, preprocessing: dict, device="cpu"):
        self.model, self.tokenizer, self.config, self.preprocessing = model, tokenizer, config, preprocessing
        self.device = torch.device(device)

    def pixels(self, images) -> torch.Tensor:
        """Normalised float ``[B, 3, S, S]`` on the model's device."""
        from mmpretrain.data import transforms as T

        p = self.preprocessing
        size = int(p["image_size"])
        if isinstance(images, torch.Tensor):
            batch = images if images.dim() == 4 else images.unsqueeze(0)
            if batch.is_floating_point():
                return batch.to(self.device, torch.float32)
        else:
            tensors = []
            for im in images:
                if isinstance(im, torch.Tensor):
                    tensors.append(im)
                    continue
                im = im.convert("RGB")
                out = im.resize((size, size), resample=3, box=T.center_box(*im.size), reducing_gap=None)
                tensors.append(T.to_uint8_chw(out))
            if tensors and all(t.is_floating_point() for t in tensors):
                return torch.stack(tensors).to(self.device, torch.float32)
            batch = torch.stack(tensors)
        if tuple(batch.shape[-2:]) != (size, size):
            raise ValueError(f"image tensors must be {size}x{size} (got {tuple(batch.shape[-2:])}); pass PIL images to resize")
        return T.normalize(batch.to(self.device), p["mean"], p["std"], torch.float32)

    def tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = _tokenize(self.tokenizer, list(texts), int(self.preprocessing["max_length"]))
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        return self.model.encode_image(self.pixels(images))[1].float()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(*self.tokens(texts))[1].float()

    @torch.no_grad()
    def score_pairs(self, images, texts: list[str]) -> torch.Tensor:
        px = self.pixels(images)
        if px.shape[0] != len(texts):
            raise ValueError(f"score_pairs: {px.shape[0]} images but {len(texts)} texts")
        return self.model.itm_logits(px, *self.tokens(texts)).float().softmax(dim=-1)[:, 1]


def load_pretrained(path: str | Path, device: str = "cpu") -> Pretrained:
    """Rebuild an export directory (``mmpretrain export``) for inference."""
    from transformers import AutoTokenizer

    from mmpretrain.models import build_model_from_dict

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ExportError(f"{path}: not an mmpretrain export (no config.json)")
    config = _read_json(cfg_file)
    if config.get("format") != FORMAT:
        raise ExportError(f"{cfg_file}: not an {FORMAT} export (format={config.get('format')!r})")
    if not isinstance(config.get("model"), dict):
        raise ExportError(f"{cfg_file}: no 'model' section")
    # read before the weights: a broken export fails fast, naming the file
    preprocessing = _read_json(path / "preprocessing.json", PREPROCESSING_KEYS)
    try:
        model = build_model_from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{cfg_file}: cannot build the model its 'model' section describes: {e}") from None
    load_state_strict(model, _load_safetensors(path / "model.safetensors"), str(path))
    model.eval().to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot load the tokenizer files: {' '.join(str(e).split())}") from None
    return Pretrained(model, tokenizer, config, preprocessing, device)


PREPROCESSING_KEYS = ("image_size", "mean", "std", "max_length")


def _read_json(file: Path, required: tuple[str, ...] = ()) -> dict:
    """A JSON object from an export file; ``ExportError`` naming the file when it is missing,
    unreadable, not a JSON object or lacks one of ``required``."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{file}: missing; the export is incomplete (re-run mmpretrain export)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{file}: unreadable: {e}") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{file}: not a JSON object")
    missing = [k for k in required if k not in data]
    if missing:
        raise ExportError(f"{file}: missing {', '.join(missing)}")
    return data


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmpretrain export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (OUTPUT_DIR/checkpoints/step_N)")
    p.add_argument("--out", required=True, help="export directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing export (atomically)")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, force=args.force)
    except ExportError as e:
        print(f"mmpretrain export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"export": str(out), "files": sorted(q.name for q in out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
