"""`mmpretrain export`: a training checkpoint -> a directory that standard libraries load.

    mmpretrain export --checkpoint runs/x/checkpoints/step_00000200 --out exports/x [--force]

Reads any checkpoint the trainer writes (docs/ARCHITECTURE.md): ``model.safetensors`` (one
process, DDP) or DeepSpeed ZeRO-2/3 partitions under ``pytorch_model/``, consolidated to fp32
with ``deepspeed.utils.zero_to_fp32``. Writes::

    OUT/model.safetensors       the whole PretrainModel (fp32), loaded by load_pretrained()
    OUT/config.json             {"format": "mmpretrain-export/1", "arch", "model": config_dict(), "towers",
                                 "not_exported": {part: why}, "verified": {check: max abs diff}, ...}
    OUT/preprocessing.json      image_size, mean, std, max_length, resize rule
    OUT/tokenizer.json, ...     the run's tokenizer, model_max_length = data.max_length
    OUT/README.md               Hub-format model card (architecture, data, steps, eval metrics, snippets)
    OUT/modules.json, router_config.json, text_pooling/, text_projection/, image_projection/, normalize/
                                OUT itself is a sentence-transformers model (Router: text / image routes)
    OUT/text_encoder/           transformers model + tokenizer + text_projection.safetensors:
                                RobertaPreLayerNormModel (unified; VLMo: the text experts) or BertModel
                                (dual encoder); last_hidden_state = encode_text tokens
    OUT/image_encoder/          timm directory whose pretrained_cfg is the run's preprocessing; loads with
                                timm.create_model("local-dir:...") and transformers.AutoModel (TimmWrapper);
                                F.normalize(model(x)) = the image embedding. The dual encoder's small_cnn has
                                no timm form: there it is a transformers PoolFormerForImageClassification,
                                F.normalize(logits) = the image embedding; AutoImageProcessor is timm's
                                transform (TimmWrapperImageProcessor); the sentence-transformers image route
                                reads it through AutoModel (PoolFormerModel) + image_pooling/.
    OUT/itm/                    ViltForImageAndTextRetrieval, sigmoid(logits) = score_pairs (unified
                                without experts, model.itm_readout=text_cls, model.fusion_source=inputs)

Parts with no standard form (small_cnn under timm, ITM of VLMo / image_cls / fusion towers / the dual encoder,
open_clip) are listed with the reason in config.json "not_exported", in the model card and as one
line each on stderr. Every file is loaded back with the standard libraries and compared with the
live model (``export.verify``, 1e-5) before the export is published; a mismatch fails the export.
See docs/evaluation.md for what each tower holds and how (LayerNorm eps, position offset).

Errors (not a checkpoint, weights that do not fit the recorded architecture, a truncated
safetensors file, an existing output) print one line and exit 2. The export is written to
``OUT.tmp`` and renamed at the end, so ``OUT`` is either complete or absent. ``--force``
replaces an existing *mmpretrain export* only, once the new one is complete; it refuses any other
directory and any ``--out`` that holds the source checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

# torch and the rest of the package are imported where they are used: `mmpretrain export --help`
# parses its arguments without importing torch (tests/unit/test_export.py)

PROBE_TEXTS = ["a red circle left of a blue square", "two green stars", "a small yellow triangle above a hexagon"]


def _preprocessing(cfg) -> dict:
    return {"image_size": int(cfg.data.image_size), "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "max_length": int(cfg.data.max_length),
            "resize": "shorter side to image_size (bicubic), center crop; pixels/255, then (x - mean) / std",
            "tokenizer": "padding='max_length', truncation, max_length"}


def _check_out(ckpt: Path, out: Path, force: bool) -> None:
    """``--force`` replaces an existing *mmpretrain export* only: never another directory, and
    never one that holds the source checkpoint."""
    from mmpretrain.export.format import CKPT_META, FORMAT, ExportError

    src = ckpt.resolve()
    for path in (out, out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")):  # all we may delete
        dst = path.resolve()
        if src == dst or dst in src.parents or (path.is_dir() and (path / CKPT_META).exists()):
            raise ExportError(f"{path} holds the source checkpoint {ckpt} (or another checkpoint); choose another --out")
    if not out.exists():
        return
    if not force:
        raise ExportError(f"{out} already exists; pass --force to replace it (the old export stays until the new one is complete)")
    cfg = out / "config.json"
    try:
        is_export = out.is_dir() and json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_export = False
    if not is_export or (out / CKPT_META).exists():
        raise ExportError(f"{out} exists and is not an mmpretrain export (no {FORMAT} config.json); "
                          "--force replaces only an earlier export, remove it yourself")


def _probe_images(size: int) -> list:
    """PIL images, square and not (landscape and portrait 4:3, an odd ratio whose crop offset
    rounds): our eval rule is timm's, so its transform must give our pixels on all of them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    shapes = [(size + 16, size + 16), (size, size), (2 * size, 3 * size // 2), (3 * size // 2, 2 * size),
              (size + 13, size)]  # (width, height)
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]
    return ims + [Image.new("RGB", (size * 2, size * 2), (200, 30, 30))]


def export_checkpoint(ckpt: str | Path, out: str | Path, force: bool = False, log=None) -> Path:
    """Export checkpoint ``ckpt`` to directory ``out`` (atomic: ``out.tmp`` then rename).
    ``log(line)`` receives one line per skipped part (what has no standard form, and why)."""
    import torch

    from mmpretrain.export.format import FORMAT, load_checkpoint
    from mmpretrain.export.towers import (SMALL_CNN_NO_TIMM, NoStandardForm, export_image_tower,
                                          export_text_tower)

    ckpt, out = Path(ckpt), Path(out)
    _check_out(ckpt, out, force)
    loaded = load_checkpoint(ckpt, allow_export=False)
    model, cfg = loaded.model, loaded.cfg
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    notes: dict[str, str] = {}
    try:
        from safetensors.torch import save_file

        from mmpretrain.data.tokenizer import tokenize
        from mmpretrain.export.card import write_model_card
        from mmpretrain.export.st import write_sentence_transformers
        from mmpretrain.export.verify import verify_export
        from mmpretrain.export.vilt import export_itm, vilt_unsupported

        pre = _preprocessing(cfg)
        sd = {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.detach().contiguous().clone()
              for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        tokenizer = loaded.tokenizer
        tokenizer.model_max_length = int(cfg.data.max_length)  # a plain tok(texts, padding=True) fits the model
        tokenizer.save_pretrained(str(tmp))
        (tmp / "preprocessing.json").write_text(json.dumps(pre, indent=2) + "\n")
        gen = torch.Generator().manual_seed(0)
        s = cfg.model.image_size
        probe_pixels = torch.randn(3, 3, s, s, generator=gen)
        tok = tokenize(tokenizer, PROBE_TEXTS, cfg.data.max_length)
        backbone = model.backbone
        towers = {}
        (tmp / "text_encoder").mkdir()
        text = export_text_tower(backbone, tmp / "text_encoder", tok["input_ids"], tok["attention_mask"],
                                 pad_token_id=int(tokenizer.pad_token_id or 0))
        tokenizer.save_pretrained(str(tmp / "text_encoder"))
        (tmp / "image_encoder").mkdir()
        try:
            image = export_image_tower(backbone, tmp / "image_encoder", probe_pixels, pre)
        except NoStandardForm as e:
            image = None
            shutil.rmtree(tmp / "image_encoder")
            notes["image_encoder"] = str(e)
        why = vilt_unsupported(backbone)
        if why is None:
            (tmp / "itm").mkdir()
            towers["itm"] = export_itm(model, tmp / "itm", probe_pixels, tok["input_ids"], tok["attention_mask"])
        else:
            notes["itm"] = why
        if image is not None and image["library"] != "timm":  # small_cnn: transformers PoolFormer, not timm
            notes["image_encoder_timm"] = SMALL_CNN_NO_TIMM
        st_why = write_sentence_transformers(tmp, text, image, int(cfg.data.max_length))
        if st_why:
            notes["sentence_transformers"] = st_why
        notes["open_clip"] = ("no open_clip_config.json: open_clip builds its timm tower from a registered "
                              "model name without width/depth overrides and its HF text tower only with its "
                              "own pooler/projection head, so neither tower maps exactly")
        towers.update({k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                       for k, v in (("text_encoder", text), ("image_encoder", image)) if v is not None})
        config = {"format": FORMAT, "arch": cfg.model.arch, "model": model.config_dict(),
                  "step": loaded.step, "source_checkpoint": str(ckpt),
                  "source_distributed_type": loaded.meta.get("distributed_type"),
                  "source_zero_stage": loaded.meta.get("zero_stage"), "towers": towers,
                  "sentence_transformers": st_why is None, "not_exported": notes}
        write_model_card(tmp, cfg, loaded, config, name=out.name)
        verify_export(tmp, model, tokenizer, pre, _probe_images(int(pre["image_size"])), PROBE_TEXTS, config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # written last
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log is not None:
        for part, why in notes.items():
            log(f"{part}: not exported: {why}")
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
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (OUTPUT_DIR/checkpoints/step_N), or a run directory "
                   "OUTPUT_DIR (its newest complete checkpoint)")
    p.add_argument("--out", required=True, help="export directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing export (atomically)")
    args = p.parse_args(argv)
    from mmpretrain.export.format import ExportError, checkpoint_of_run

    try:
        ckpt, from_run = checkpoint_of_run(args.checkpoint)
        if from_run:
            print(f"mmpretrain export: {args.checkpoint} is a run directory; exporting its newest checkpoint {ckpt}",
                  file=sys.stderr)
        out = export_checkpoint(ckpt, args.out, force=args.force,
                                log=lambda line: print(f"mmpretrain export: {line}", file=sys.stderr))
    except ExportError as e:
        print(f"mmpretrain export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"export": str(out), "files": sorted(q.name for q in out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
