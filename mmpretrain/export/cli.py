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
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from mmpretrain.export.format import FORMAT, ExportError, load_checkpoint
from mmpretrain.export.towers import export_image_tower, export_text_tower


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

        from mmpretrain.data.tokenizer import tokenize

        sd = {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.detach().contiguous().clone()
              for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        loaded.tokenizer.save_pretrained(str(tmp))
        (tmp / "preprocessing.json").write_text(json.dumps(_preprocessing(cfg), indent=2) + "\n")
        gen = torch.Generator().manual_seed(0)
        s = cfg.model.image_size
        probe_pixels = torch.randn(2, 3, s, s, generator=gen)
        tok = tokenize(loaded.tokenizer, ["a red circle left of a blue square", "two green stars"],
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
