"""Exports that the ecosystem uses as-is (issue 10), loaded where mmpretrain cannot be imported.

For every shipped CPU config (tiny, tiny_itm, vlmo_tiny, dual_encoder_tiny, siamese_triplet, shrunk to a
tiny width/depth) a checkpoint is exported and the export directory is read by a *separate*
Python process (``-I``, ``sys.modules['mmpretrain'] = None``: ``import mmpretrain`` fails there)
with the standard libraries only:

- ``SentenceTransformer(OUT).encode(texts / PIL images)``;
- ``transformers.AutoModel(OUT/text_encoder)`` + ``AutoTokenizer`` (plain ``padding=True``) + the
  declared pooling (``OUT/text_pooling/config.json``) and projection;
- ``timm.create_model("local-dir:OUT/image_encoder")`` + its own ``resolve_data_config`` /
  ``create_transform``; ``transformers.AutoModel`` (TimmWrapper) + ``AutoImageProcessor`` on the
  same directory;
- ``transformers.ViltForImageAndTextRetrieval(OUT/itm)``: ``sigmoid(logits)``;
- for the ``small_cnn`` dual encoder (no timm form): ``AutoModelForImageClassification(OUT/image_encoder)``
  (PoolFormer) on the pixels of timm's transform of its ``pretrained_cfg``, which its
  ``AutoImageProcessor`` is too; ``SentenceTransformer.encode(images)`` through ``AutoModel``
  (PoolFormerModel) + mean pooling.

Each result is compared with ``load_pretrained(OUT)``'s ``embed_texts`` / ``embed_images`` /
``score_pairs`` within 1e-5. Parts with no standard form must be named in ``not_exported``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _exportutil import REPO, export_files, make_shards, tiny_overrides

from mmpretrain.export import export_checkpoint, load_pretrained

pytest.importorskip("sentence_transformers")

ATOL = 1e-5
TEXTS = ["a red circle left of a blue square", "two green stars on a striped background", "a hexagon",
         "a small yellow triangle above a large purple ring next to an orange cross and a cyan star "
         "with many more words than the model takes"]  # longer than max_length: truncated

CONFIGS = {
    # case: (config file, extra overrides, image_encoder/ library, expects itm/)
    "tiny": ("tiny", [], "timm", False),  # fusion over the towers: no ViLT form
    # ViLT's layout (fused over the inputs, linear patches): itm/ too
    "tiny_itm": ("tiny_itm", [], "timm", True),
    "vlmo_tiny": ("vlmo_tiny", [], "timm", False),
    # the default's convolutional stem is timm's R+ViT hybrid; the linear patch stem a plain ViT
    "tiny+patch_stem": ("tiny", ["model.image_stem=patch"], "timm", False),
    # no ViLT form for the resnet stem even when fused over the inputs (ViLT embeds linear patches)
    # the default's match head and fusion gates belong to fusion over the towers: ViLT's layout back
    "tiny+inputs_fusion+resnet_stem": ("tiny", ["model.fusion_source=inputs", "model.fusion_gates=false",
                                                "model.itm_head=pooler"], "timm", False),
    # the shipped dual-encoder configs keep small_cnn (it learns much better than the timm towers
    # tried, docs/BENCHMARKS.md): no timm form; a transformers PoolFormerForImageClassification
    "dual_encoder_tiny": ("dual_encoder_tiny", [], "transformers", False),
    "siamese_triplet": ("siamese_triplet", [], "transformers", False),
    # a standard timm CNN with GroupNorm: the tower projection folded into timm's head
    "dual_encoder_tiny+test_efficientnet_gn": ("dual_encoder_tiny", ["model.image_backbone=test_efficientnet_gn"],
                                               "timm", False),
    # other timm image backbones
    "dual_encoder_tiny+test_resnet": ("dual_encoder_tiny", ["model.image_backbone=test_resnet"], "timm", False),
    "siamese_triplet+test_vit": ("siamese_triplet", ["model.image_backbone=test_vit"], "timm", False),
}

CHILD = r'''
import sys
sys.modules["mmpretrain"] = None          # the export must stand alone
try:
    import mmpretrain  # noqa: F401
    raise SystemExit("mmpretrain is importable in the child")
except ImportError:
    pass
import json, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import torch, torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()

texts = json.loads(Path(sys.argv[1]).read_text())


def one(out, images_dir, result):  # one export directory (imports are paid once for all of them)
    images = [Image.open(p).convert("RGB") for p in sorted(images_dir.glob("*.png"))]
    r = {}
    with torch.no_grad():
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(out), device="cpu")
        r["st_text"] = st.encode(texts, convert_to_tensor=True)
        has_image = (out / "image_encoder").is_dir()
        poolformer = has_image and json.loads((out / "image_encoder" / "config.json").read_text()).get("model_type") == "poolformer"
        r["image_library"] = None if not has_image else "transformers" if poolformer else "timm"
        if has_image:
            r["st_image"] = st.encode(images, convert_to_tensor=True)

        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(out / "text_encoder"))
        r["model_max_length"] = tok.model_max_length
        b = tok(texts, padding=True, truncation=True, return_tensors="pt")
        enc = AutoModel.from_pretrained(str(out / "text_encoder")).eval()
        r["text_class"] = type(enc).__name__
        h = enc(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        mode = json.loads((out / "text_pooling" / "config.json").read_text())["pooling_mode"]
        m = b["attention_mask"].unsqueeze(-1).float()
        pooled = h[:, 0] if mode == "cls" else (h * m).sum(1) / m.sum(1)
        w = load_file(str(out / "text_encoder" / "text_projection.safetensors"))["weight"]
        r["hf_text"] = F.normalize(pooled @ w.T, dim=-1)

        if poolformer:  # small_cnn: AutoModelForImageClassification, timm's transform of its pretrained_cfg
            from timm.data import create_transform, resolve_data_config
            from transformers import AutoModelForImageClassification
            pf = AutoModelForImageClassification.from_pretrained(str(out / "image_encoder")).eval()
            r["image_class"] = type(pf).__name__
            tf = create_transform(**resolve_data_config({}, pretrained_cfg=pf.config.pretrained_cfg))
            px = torch.stack([tf(im) for im in images])
            r["timm_pixels"] = px
            r["timm_cfg"] = {k: pf.config.pretrained_cfg.get(k) for k in ("mean", "std", "crop_pct", "crop_mode",
                                                                          "interpolation", "input_size")}
            r["hf_image"] = F.normalize(pf(pixel_values=px).logits, dim=-1)
            proc = AutoImageProcessor.from_pretrained(str(out / "image_encoder"))
            r["hf_pixels"] = proc(images, return_tensors="pt")["pixel_values"]
        elif has_image:
            import timm
            from timm.data import create_transform, resolve_data_config
            vit = timm.create_model(f"local-dir:{out / 'image_encoder'}", pretrained=True).eval()
            tf = create_transform(**resolve_data_config({}, model=vit))
            px = torch.stack([tf(im) for im in images])
            r["timm_pixels"] = px
            r["timm_image"] = F.normalize(vit(px), dim=-1)
            r["timm_cfg"] = {k: vit.pretrained_cfg.get(k) for k in ("mean", "std", "crop_pct", "crop_mode", "interpolation",
                                                                    "input_size")}
            wrapper = AutoModel.from_pretrained(str(out / "image_encoder")).eval()
            proc = AutoImageProcessor.from_pretrained(str(out / "image_encoder"))
            hf_px = proc(images, return_tensors="pt")["pixel_values"]
            r["hf_pixels"] = hf_px
            dense = load_file(str(out / "image_projection" / "model.safetensors"))
            pooled = wrapper(pixel_values=hf_px).pooler_output
            y = pooled @ dense["linear.weight"].T + dense.get("linear.bias", torch.zeros(()))
            r["hf_image"] = F.normalize(y, dim=-1)
            if (out / "itm").is_dir():
                from transformers import ViltForImageAndTextRetrieval
                vilt = ViltForImageAndTextRetrieval.from_pretrained(str(out / "itm")).eval()
                n = min(len(images), len(texts))
                logits = vilt(input_ids=b["input_ids"][:n], attention_mask=b["attention_mask"][:n],
                              pixel_values=px[:n]).logits
                r["vilt"] = logits.reshape(-1).sigmoid()
    torch.save(r, str(result))


args = sys.argv[2:]
for i in range(0, len(args), 3):
    out, images_dir, result = (Path(a) for a in args[i:i + 3])
    try:
        one(out, images_dir, result)
    except Exception:  # this export's failure, reported by its own test case
        import traceback
        torch.save({"error": traceback.format_exc()[-3000:]}, str(result))
'''


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def _checkpoint(name: str, run_dir: Path, shards: Path, extra=()) -> Path:
    """A tiny version of configs/<name>.yaml, freshly initialised, with its zero-initialised
    modality-type embeddings and the ITM head made non-trivial (so folding them is tested)."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from mmpretrain.config import load_config, to_dict
    from mmpretrain.models import build_model
    from mmpretrain.trainer.checkpoint import save_checkpoint

    cfg = load_config(REPO / "configs" / f"{name}.yaml", tiny_overrides(shards, run_dir, extra))
    tok = AutoTokenizer.from_pretrained(str(shards / "tokenizer"))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, len(tok))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "type_embed" in pname:
                p.normal_(0.0, 0.1)
            elif "itm_head" in pname:
                p.normal_(0.0, 0.5)
            elif "norm" in pname.lower() or "image_tower.backbone.net." in pname:  # norm affines (small_cnn's
                p.add_(torch.randn_like(p) * 0.1)                                   # GroupNorms too): not identity
    acc = Accelerator(cpu=True)
    model = acc.prepare(model)
    meta = {"config": to_dict(cfg), "vocab_size": len(tok), "distributed_type": "NO", "zero_stage": 0,
            "world_size": 1}
    return save_checkpoint(acc, run_dir / "checkpoints", 3, meta, {}, tok)


def _images(directory: Path, size: int) -> list:
    """PIL images, square and not: 64x48 and 48x64 (landscape, portrait), an odd ratio whose long
    side and crop offset round (size + 13 by size), squares at several scales. Our eval rule is
    timm's resize-shorter-side-then-centre-crop, so timm's transform must give our pixels on all."""
    import numpy as np
    from PIL import Image

    directory.mkdir()
    rng = np.random.default_rng(3)
    shapes = [(64, 48), (48, 64), (size + 13, size), (size, size), (2 * size, 2 * size), (size + 7, size + 7)]
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]
    ims.append(Image.new("RGB", (size * 3, size * 3), (200, 30, 30)))
    for i, im in enumerate(ims):
        im.save(directory / f"{i}.png")
    return ims


def _children(jobs: dict[str, tuple[Path, Path]], tmp: Path) -> dict[str, dict]:
    """Run CHILD once over every ``name: (export dir, images dir)``; per name its result dict."""
    (tmp / "texts.json").write_text(json.dumps(TEXTS))
    (tmp / "child.py").write_text(CHILD)
    args = []
    for name, (out, images_dir) in jobs.items():
        args += [str(out), str(images_dir), str(tmp / f"result-{name}.pt")]
    proc = subprocess.run([sys.executable, "-I", str(tmp / "child.py"), str(tmp / "texts.json"), *args],
                          cwd=str(tmp), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: torch.load(str(tmp / f"result-{name}.pt"), weights_only=False) for name in jobs}


@pytest.fixture(scope="module")
def exported(shards, tmp_path_factory):
    """Every case of CONFIGS checkpointed and exported, then read by one child process (the
    standard libraries' import cost is paid once, not per case): name -> (export dir or the
    exception the export raised, its logged lines, its images dir, the child's result)."""
    root = tmp_path_factory.mktemp("exports")
    done, jobs = {}, {}
    for name, (config_name, extra, _, _) in CONFIGS.items():
        logged: list[str] = []
        try:
            ckpt = _checkpoint(config_name, root / name / "run", shards, extra)
            out = export_checkpoint(ckpt, root / name / "out", log=logged.append)
        except Exception as e:  # noqa: BLE001 - raised again by that case's test
            done[name] = (e, logged, None)
            continue
        size = json.loads((out / "config.json").read_text())["model"]["model"]["image_size"]
        _images(root / name / "images", size)
        done[name] = (out, logged, root / name / "images")
        jobs[name] = (out, root / name / "images")
    results = _children(jobs, root) if jobs else {}
    return {name: (*done[name], results.get(name)) for name in CONFIGS}


def _maxdiff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_standard_libraries_reproduce_the_model(name, exported):
    from PIL import Image

    config_name, extra, image_library, want_itm = CONFIGS[name]
    want_image_tower = image_library is not None
    out, logged, images_dir, got = exported[name]
    if isinstance(out, Exception):
        raise out
    config = json.loads((out / "config.json").read_text())
    assert (out / "image_encoder").is_dir() == want_image_tower
    assert (out / "itm").is_dir() == want_itm
    for part, present in (("image_encoder", want_image_tower), ("itm", want_itm)):
        assert (part in config["not_exported"]) != present  # every absent part says why
        assert any(line.startswith(f"{part}: not exported: ") for line in logged) != present
    assert config["sentence_transformers"] is True
    assert config["towers"]["image_encoder"]["library"] == image_library
    # small_cnn: the timm form is named as missing; every image tower has a sentence-transformers route
    assert ("image_encoder_timm" in config["not_exported"]) == (image_library == "transformers")
    assert "sentence_transformers_image" not in config["not_exported"]
    assert max(config["verified"]["max_abs_diff"].values()) <= ATOL
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "## Usage" in card and "## Evaluation" in card
    assert "text route only" not in card and "text and image routes" in card
    assert ("AutoModelForImageClassification.from_pretrained" in card) == (image_library == "transformers")
    assert ('create_model("local-dir:' in card) == (image_library == "timm")

    images = [Image.open(p).convert("RGB") for p in sorted(images_dir.glob("*.png"))]
    assert "error" not in got, got.get("error")

    live = load_pretrained(out)
    want_txt = live.embed_texts(TEXTS)
    max_length = json.loads((out / "preprocessing.json").read_text())["max_length"]
    assert got["model_max_length"] == max_length
    unified = config["arch"] == "unified"
    assert got["text_class"] == ("RobertaPreLayerNormModel" if unified else "BertModel")
    diffs = {"st_text": _maxdiff(got["st_text"], want_txt), "hf_text": _maxdiff(got["hf_text"], want_txt)}
    assert got["image_library"] == image_library
    if image_library == "timm":
        want_img = live.embed_images(images)
        ours = live.pixels(images)
        diffs.update(timm_pixels=_maxdiff(got["timm_pixels"], ours), hf_pixels=_maxdiff(got["hf_pixels"], ours),
                     st_image=_maxdiff(got["st_image"], want_img), timm_image=_maxdiff(got["timm_image"], want_img),
                     hf_image=_maxdiff(got["hf_image"], want_img))
    elif image_library == "transformers":
        assert got["image_class"] == "PoolFormerForImageClassification"
        want_img = live.embed_images(images)
        ours = live.pixels(images)
        # AutoImageProcessor is timm's transform of the pretrained_cfg (TimmWrapperImageProcessor):
        # our pixels exactly; SentenceTransformer reads the map through AutoModel (PoolFormerModel)
        diffs.update(timm_pixels=_maxdiff(got["timm_pixels"], ours), hf_pixels=_maxdiff(got["hf_pixels"], ours),
                     hf_image=_maxdiff(got["hf_image"], want_img), st_image=_maxdiff(got["st_image"], want_img))
    if want_image_tower:
        pre = json.loads((out / "preprocessing.json").read_text())
        assert got["timm_cfg"]["mean"] == tuple(pre["mean"]) or list(got["timm_cfg"]["mean"]) == pre["mean"]
        assert got["timm_cfg"]["crop_pct"] == 1.0 and got["timm_cfg"]["interpolation"] == "bicubic"
        assert got["timm_cfg"]["crop_mode"] == "center"
        assert any(im.size[0] != im.size[1] for im in images)  # the non-square inputs are compared too
    if want_itm:
        n = min(len(images), len(TEXTS))
        want_itm_p = live.score_pairs(images[:n], TEXTS[:n])
        assert float(want_itm_p.max() - want_itm_p.min()) > 1e-3  # a non-trivial ITM head
        diffs["vilt"] = _maxdiff(got["vilt"], want_itm_p)
    print(name, json.dumps(diffs))
    assert all(d <= ATOL for d in diffs.values()), diffs


def test_vilt_refuses_what_it_cannot_hold():
    from mmpretrain.export import ExportError
    from mmpretrain.export.vilt import vilt_state
    from mmpretrain.models import LossConfig, ModelConfig, build_model

    small = dict(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, embed_dim=8, max_text_length=8)
    for kw, word in ((dict(modality_experts=True), "modality_experts"), (dict(itm_readout="image_cls"), "image_cls"),
                     (dict(itm_head="match"), "itm_head"),
                     (dict(fusion_source="towers"), "fusion_source"), (dict(arch="dual_encoder"), "dual_encoder")):
        model = build_model(ModelConfig(**small, **kw), LossConfig(), 50)
        with pytest.raises(ExportError, match=word) as e:
            vilt_state(model.backbone)
        assert len(str(e.value).splitlines()) == 1


def test_force_never_replaces_a_directory_holding_the_checkpoint(shards, tmp_path, capsys):
    from mmpretrain.export import main

    ckpt = _checkpoint("tiny", tmp_path / "run", shards)
    for out in (tmp_path / "run", ckpt):
        rc = main(["--checkpoint", str(ckpt), "--out", str(out), "--force"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "holds the source checkpoint" in err and len(err.splitlines()) == 1
    assert (ckpt / "mmpretrain.json").is_file() and (ckpt / "model.safetensors").is_file()


RETRIEVAL_CHILD = r'''
import sys
sys.modules["mmpretrain"] = None
import io, json, tarfile, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import torch
from PIL import Image
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()
from sentence_transformers import SentenceTransformer

out, result, shards = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
images, image_index, captions, caption_image = [], {}, [], []
for shard in shards:
    samples = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.rsplit(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    for key in sorted(samples):
        s = samples[key]
        image_id = json.loads(s["json"])["image_id"]
        if image_id not in image_index:
            image_index[image_id] = len(images)
            images.append(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        captions.append(s["txt"].decode("utf-8").strip())
        caption_image.append(image_index[image_id])
st = SentenceTransformer(str(out), device="cpu")
txt = st.encode(captions, convert_to_tensor=True)
img = st.encode(images, convert_to_tensor=True)  # small_cnn too: the PoolFormer through AutoModel
scores = (img @ txt.T).double()
pos = torch.arange(len(images))[:, None] == torch.tensor(caption_image)[None, :]

def ranks(s, p):  # wrong candidates scoring >= the best right one (the COCO rule, pessimistic on ties)
    best = s.masked_fill(~p, float("-inf")).max(dim=1, keepdim=True).values
    return ((s >= best) & ~p).sum(dim=1)

r = {}
for name, rk in (("i2t", ranks(scores, pos)), ("t2i", ranks(scores.T, pos.T))):
    for k in (1, 5, 10):
        r[f"{name}_R@{k}"] = 100.0 * float((rk < k).sum()) / rk.numel()
result.write_text(json.dumps(r))
'''


@pytest.mark.parametrize("config_name", ["tiny", "dual_encoder_tiny"])
def test_held_out_retrieval_with_standard_libraries_equals_mmpretrain_eval(config_name, shards, tmp_path):
    from mmpretrain.evaluation import cli as eval_cli

    ckpt = _checkpoint(config_name, tmp_path / "run", shards)
    out = export_checkpoint(ckpt, tmp_path / "out")
    val = sorted(str(p) for p in shards.glob("val-*.tar"))
    assert eval_cli.main(["--checkpoint", str(out), "--shards", f"{shards}/val-*.tar", "--out",
                          str(tmp_path / "eval"), "eval.compositional=false", "eval.itm_hard_negatives=false",
                          "eval.report=false"]) == 0
    want = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    (tmp_path / "child.py").write_text(RETRIEVAL_CHILD)
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "child.py"), str(out), str(tmp_path / "r.json"), *val],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "r.json").read_text())
    print("held-out retrieval", config_name, json.dumps(got))
    assert len(got) == 6 and got == {k: want[k] for k in got}, (got, want)


def test_bf16_checkpoint_exports_the_same_files_as_its_fp32_equivalent(shards, tmp_path):
    """A checkpoint whose weights are stored in bf16 (and a run marked mixed_precision=bf16) and
    the fp32 checkpoint of the same values export byte-identical files; so do two exports of one
    checkpoint (the export is a function of the weights, config and tokenizer)."""
    from safetensors.torch import load_file, save_file

    ckpt32 = _checkpoint("tiny", tmp_path / "run32", shards)
    sd = load_file(str(ckpt32 / "model.safetensors"))
    rounded = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in sd.items()}
    save_file(rounded, str(ckpt32 / "model.safetensors"))
    ckpt16 = tmp_path / "run16" / "checkpoints" / ckpt32.name
    import shutil

    shutil.copytree(ckpt32, ckpt16)
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()},
              str(ckpt16 / "model.safetensors"))
    meta = json.loads((ckpt16 / "mmpretrain.json").read_text())
    meta["config"].setdefault("train", {})["mixed_precision"] = "bf16"
    (ckpt16 / "mmpretrain.json").write_text(json.dumps(meta))
    a = export_files(export_checkpoint(ckpt32, tmp_path / "a" / "export"))
    b = export_files(export_checkpoint(ckpt16, tmp_path / "b" / "export"))
    again = export_files(export_checkpoint(ckpt32, tmp_path / "c" / "export"))
    assert a == again
    assert set(a) == set(b) and [k for k in a if a[k] != b[k]] == []


def test_without_sentence_transformers_the_rest_is_exported_and_the_gap_named(shards, tmp_path, monkeypatch):
    from mmpretrain.export import st

    monkeypatch.setattr(st, "sentence_transformers_available", lambda: "sentence-transformers is not installed")
    ckpt = _checkpoint("tiny", tmp_path / "run", shards, ["model.fusion_source=inputs", "model.fusion_gates=false",
                                                           "model.itm_head=pooler", "model.image_stem=patch"])
    logged: list[str] = []
    out = export_checkpoint(ckpt, tmp_path / "out", log=logged.append)
    config = json.loads((out / "config.json").read_text())
    assert config["sentence_transformers"] is False and not (out / "modules.json").exists()
    assert "not installed" in config["not_exported"]["sentence_transformers"]
    assert any(line.startswith("sentence_transformers: not exported") for line in logged)
    assert (out / "itm").is_dir() and (out / "image_encoder").is_dir() and (out / "text_encoder").is_dir()
    assert "SentenceTransformer" not in (out / "README.md").read_text()


def test_model_card_carries_the_runs_eval_metrics_and_the_gaps(shards, tmp_path):
    ckpt = _checkpoint("vlmo_tiny", tmp_path / "run", shards)
    metrics_dir = tmp_path / "run" / "eval" / ckpt.name
    metrics_dir.mkdir(parents=True)
    (metrics_dir / "metrics.json").write_text(json.dumps({"i2t_R@1": 12.5, "t2i_R@10": 61.25, "mean_recall": 33.0}))
    out = export_checkpoint(ckpt, tmp_path / "out")
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: sentence-transformers" in front and "pipeline_tag: feature-extraction" in front
    assert "| i2t_R@1 | 12.50 |" in card and "| t2i_R@10 | 61.25 |" in card
    assert "modality experts" in card and "steps: 3" in card
    # data.global_batch_size is the batch of all processes together, not a per-process one
    assert "global batch 8 (per micro-step, all processes together)" in card and "per process" not in card
    # the one-line reason for the missing ITM directory, in the card and in config.json
    itm_line = [line for line in card.splitlines() if line.startswith("- **itm**")]
    assert len(itm_line) == 1 and "ViLT has one feed-forward per block" in itm_line[0]
    assert "ViLT" in json.loads((out / "config.json").read_text())["not_exported"]["itm"]
    assert 'SentenceTransformer("out")' in card and 'local-dir:out/image_encoder' in card


@pytest.mark.parametrize("pad_id", [0, 1])
def test_roberta_text_tower_for_any_pad_id(pad_id, tmp_path):
    """RoBERTa numbers positions from pad_token_id + 1: the table is stored there, whatever the
    tokenizer's pad id; with VLMo experts the blocks take the text experts."""
    from transformers import AutoModel

    from mmpretrain.export.towers import export_text_tower
    from mmpretrain.models import LossConfig, ModelConfig, build_model

    torch.manual_seed(1)
    model = build_model(ModelConfig(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, embed_dim=8,
                                    max_text_length=10, modality_experts=True), LossConfig(), 60).eval()
    with torch.no_grad():
        model.backbone.text_embed.type_embed.normal_(0.0, 0.1)
    ids = torch.randint(5, 60, (3, 10))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad_id, 0
    info = export_text_tower(model.backbone, tmp_path, ids, mask, pad_token_id=pad_id)
    assert info["class"] == "RobertaPreLayerNormModel"
    hf = AutoModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        want = model.encode_text(ids, mask)[0]
    m = mask.bool()
    assert float((got[m] - want[m]).abs().max()) <= ATOL


@pytest.mark.parametrize("config_name", ["tiny", "dual_encoder_tiny"])
def test_a_written_form_that_differs_from_the_model_is_never_published(config_name, shards, tmp_path, monkeypatch):
    """The export loads what it wrote with the standard libraries before publishing: a
    pretrained_cfg whose mean is off (the towers' own probe checks cannot see it) fails the
    export in one line naming the check, and neither OUT nor OUT.tmp is left."""
    from mmpretrain.export import ExportError, towers

    real = towers.timm_pretrained_cfg

    def off_mean(preprocessing, *args, **kwargs):
        return real(dict(preprocessing, mean=[m + 0.01 for m in preprocessing["mean"]]), *args, **kwargs)

    monkeypatch.setattr(towers, "timm_pretrained_cfg", off_mean)
    ckpt = _checkpoint(config_name, tmp_path / "run", shards)
    with pytest.raises(ExportError, match=r"export check failed: timm transform.* vs our eval pixels") as e:
        export_checkpoint(ckpt, tmp_path / "out")
    assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
