"""Export: round trip, the standard-library towers, bad input (the 2-process ZeRO-3
consolidation is in tests/distributed/test_export_distributed.py).

Checkpoints are written with the trainer's own ``save_checkpoint`` (Accelerate ``save_state`` +
``mmpretrain.json`` + ``tokenizer/``), on a tiny model over tiny synthetic shards.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from _exportutil import make_checkpoint, make_shards

from mmpretrain.export import ExportError, export_checkpoint, load_checkpoint, load_pretrained, main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def exported(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "run", shards)
    return ckpt, export_checkpoint(ckpt, root / "out")


def _probe(p, n=3):
    g = torch.Generator().manual_seed(1)
    s = p.preprocessing["image_size"]
    pixels = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)
    texts = ["a red circle left of a blue square", "two green stars on a striped background", "a hexagon"][:n]
    return pixels, texts


def test_round_trip_gives_identical_embeddings_and_itm(exported):
    ckpt, out = exported
    assert {q.name for q in out.iterdir()} >= {"config.json", "image_encoder", "model.safetensors",
                                               "preprocessing.json", "text_encoder", "itm", "README.md"}
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "mmpretrain-export/1" and config["arch"] == "unified"
    assert config["model"]["model"]["width"] == 32
    assert json.loads((out / "preprocessing.json").read_text())["max_length"] == 16
    live = load_checkpoint(ckpt)
    p = load_pretrained(out)
    pixels, texts = _probe(p)
    with torch.no_grad():
        x = p.pixels(pixels)
        ids, mask = p.tokens(texts)
        want_img = live.model.encode_image(x)[1]
        want_txt = live.model.encode_text(ids, mask)[1]
        want_itm = live.model.itm_logits(x, ids, mask).softmax(-1)[:, 1]
    assert torch.equal(p.embed_images(pixels), want_img)
    assert torch.equal(p.embed_texts(texts), want_txt)
    assert torch.equal(p.score_pairs(pixels, texts), want_itm)
    assert p.embed_images(pixels).norm(dim=-1).sub(1).abs().max() < 1e-5
    # PIL input goes through the evaluation resize/crop
    from PIL import Image

    im = Image.new("RGB", (50, 40), (200, 10, 10))
    assert p.embed_images([im]).shape == (1, 16)


def test_embed_images_and_score_pairs_take_file_paths(exported, tmp_path):
    from pathlib import Path

    from PIL import Image

    _, out = exported
    p = load_pretrained(out)
    ims = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (30, 30), (10, 10, 200))]
    ims[0].save(tmp_path / "a.png")
    ims[1].save(tmp_path / "b.png")
    want = p.embed_images(ims)
    assert torch.equal(p.embed_images([str(tmp_path / "a.png"), Path(tmp_path / "b.png")]), want)
    assert torch.equal(p.score_pairs([tmp_path / "a.png"], ["a red circle"]), p.score_pairs(ims[:1], ["a red circle"]))
    with pytest.raises(ValueError, match="cannot read image"):
        p.embed_images([tmp_path / "missing.jpg"])
    from mmpretrain.export.inference import Pretrained

    assert Pretrained.score_pairs.__doc__ and "probability" in Pretrained.score_pairs.__doc__


def test_text_tower_loads_with_automodel_and_matches(exported):
    from transformers import AutoModel, AutoTokenizer

    _, out = exported
    bert = AutoModel.from_pretrained(str(out / "text_encoder")).eval()
    assert type(bert).__name__ == "RobertaPreLayerNormModel"  # the whole pre-LN text path
    p = load_pretrained(out)
    tok = AutoTokenizer.from_pretrained(str(out))  # the export root is a tokenizer directory too
    enc = tok(["a red circle left of a blue square", "a star"], padding="max_length", max_length=16,
              truncation=True, return_tensors="pt")
    with torch.no_grad():
        got = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        want = p.model.encode_text(enc["input_ids"], enc["attention_mask"])[0]
    m = enc["attention_mask"].bool()
    torch.testing.assert_close(got[m], want[m], rtol=0, atol=1e-5)
    # the folded modality-type embedding is non-zero in this model, so the fold mattered
    assert p.model.backbone.text_embed.type_embed.abs().max() > 0


def test_image_tower_loads_with_timm_and_matches(exported):
    import timm

    _, out = exported
    vit = timm.create_model(f"local-dir:{out / 'image_encoder'}", pretrained=True).eval()
    assert type(vit).__name__ == "VisionTransformer"
    p = load_pretrained(out)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens, emb = p.model.encode_image(x)
        torch.testing.assert_close(vit.forward_features(x), tokens, rtol=0, atol=1e-6)
        torch.testing.assert_close(F.normalize(vit(x), dim=-1), emb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [32, 64])
def test_eval_pixels_are_timms_transform_of_the_exported_pretrained_cfg(size):
    """The loader's eval pixels (and load_pretrained's) are what timm's resolve_data_config +
    create_transform make of the pretrained_cfg an export writes, bit for bit, non-square images
    included (JPEG and PNG, 64x48 / 48x64 / odd ratios / a large photo)."""
    import io

    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from mmpretrain.data import transforms as T
    from mmpretrain.export.inference import Pretrained
    from mmpretrain.export.towers import timm_pretrained_cfg

    pre = {"image_size": size, "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}
    cfg = resolve_data_config({}, pretrained_cfg=timm_pretrained_cfg(pre, 8, "head", "conv"))
    tf, tf_uint8 = create_transform(**cfg), create_transform(**cfg, use_prefetcher=True)
    live = Pretrained(None, None, {}, pre)
    rng = np.random.default_rng(0)
    for w, h in [(64, 48), (48, 64), (size + 13, size), (size, size + 1), (33, 200), (640, 480), (size, size)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            im.save(buf, fmt)
            data = buf.getvalue()
            decoded = Image.open(io.BytesIO(data)).convert("RGB")
            ours = T.eval_transform(data, size)
            assert torch.equal(ours, tf_uint8(decoded)), (w, h, fmt)
            normed = T.normalize(ours, pre["mean"], pre["std"])
            assert float((normed - tf(decoded)).abs().max()) <= 1e-6, (w, h, fmt)
            assert torch.equal(live.pixels([decoded])[0], normed), (w, h, fmt)


def test_dual_encoder_text_tower_is_the_whole_bert(shards, tmp_path):
    from transformers import AutoModel

    from safetensors.torch import load_file

    ckpt = make_checkpoint(tmp_path / "run", shards, ["model.arch=dual_encoder", "model.fusion=linear",
                                                      "model.image_backbone=small_cnn"])
    out = export_checkpoint(ckpt, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    # small_cnn is not a timm model: its image_encoder/ is a transformers PoolFormer (tested in
    # test_export_ecosystem.py, with its sentence-transformers image route); the timm form says why not
    assert config["towers"]["image_encoder"]["class"] == "PoolFormerForImageClassification"
    assert "small_cnn" in config["not_exported"]["image_encoder_timm"]
    assert "sentence_transformers_image" not in config["not_exported"] and config["sentence_transformers"]
    assert json.loads((out / "router_config.json").read_text())["structure"]["image"] == [
        "image_encoder", "image_pooling", "image_projection", "normalize"]
    bert = AutoModel.from_pretrained(str(out / "text_encoder")).eval()
    assert bert.config.num_hidden_layers == 2
    w = load_file(str(out / "text_encoder" / "text_projection.safetensors"))["weight"]
    p = load_pretrained(out)
    ids, mask = p.tokens(["a purple ring", "an orange cross above a cyan hexagon"])
    with torch.no_grad():
        h = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert p.config["model"]["model"]["pool"] == "mean"
        m = mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
        torch.testing.assert_close(F.normalize(pooled @ w.t(), dim=-1), p.embed_texts(
            ["a purple ring", "an orange cross above a cyan hexagon"]), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- bad input

def _run_cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    rc, err = _run_cli(["--checkpoint", str(tmp_path / "junk"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "not an mmpretrain checkpoint" in err
    rc, err = _run_cli(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


def test_config_mismatch_and_truncated_weights(exported, tmp_path, capsys):
    import shutil

    ckpt, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    meta = json.loads((bad / "mmpretrain.json").read_text())
    meta["config"]["model"]["width"] = 64
    meta["config"]["model"]["num_heads"] = 4
    (bad / "mmpretrain.json").write_text(json.dumps(meta))
    rc, err = _run_cli(["--checkpoint", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "do not match the architecture" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()

    trunc = tmp_path / "trunc"
    shutil.copytree(ckpt, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    rc, err = _run_cli(["--checkpoint", str(trunc), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "safetensors" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


def test_a_run_directory_exports_its_newest_complete_checkpoint(exported, tmp_path, capsys):
    import shutil

    ckpt, _ = exported
    run = tmp_path / "run"
    shutil.copytree(ckpt.parent.parent, run)
    (run / "checkpoints" / "step_00000009").mkdir()  # incomplete: no mmpretrain.json
    rc, err = _run_cli(["--checkpoint", str(run), "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    assert f"exporting its newest checkpoint {run / 'checkpoints' / ckpt.name}" in err
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["step"] == 3 and config["source_checkpoint"] == str(run / "checkpoints" / ckpt.name)
    empty = tmp_path / "empty"
    (empty / "checkpoints" / "step_00000001").mkdir(parents=True)
    rc, err = _run_cli(["--checkpoint", str(empty), "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "run directory with no complete checkpoint" in err
    assert not (tmp_path / "o2").exists()


def test_existing_export_is_never_clobbered(exported, tmp_path, capsys):
    ckpt, _ = exported
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _run_cli(["--checkpoint", str(ckpt), "--out", str(out)], capsys)
    assert rc == 2 and "already exists" in err and (out / "keep.txt").read_text() == "mine"
    # --force with a bad checkpoint leaves the existing directory as it was
    rc, err = _run_cli(["--checkpoint", str(tmp_path), "--out", str(out), "--force"], capsys)
    assert rc == 2 and (out / "keep.txt").read_text() == "mine"
    # --force replaces only an earlier mmpretrain export: not this foreign directory
    rc, err = _run_cli(["--checkpoint", str(ckpt), "--out", str(out), "--force"], capsys)
    assert rc == 2 and "not an mmpretrain export" in err and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    (out / "stale.txt").write_text("old export")
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert not (tmp_path / "out.tmp").exists() and not (tmp_path / "out.old").exists()


def test_loading_an_export_dir_that_is_not_one(tmp_path):
    with pytest.raises(ExportError):
        load_pretrained(tmp_path)


def test_load_pretrained_of_a_checkpoint_names_the_export_command(exported):
    ckpt, _ = exported
    for path in (ckpt, ckpt.parent.parent):  # a checkpoint, its run directory
        with pytest.raises(ExportError) as e:
            load_pretrained(path)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and f"mmpretrain export --checkpoint {path} --out" in msg


@pytest.mark.parametrize("damage", ["no_preprocessing", "preprocessing_lacks_std", "config_not_json"])
def test_broken_export_is_one_export_error_naming_the_file(exported, tmp_path, capsys, damage):
    """load_pretrained and `mmpretrain eval` on an incomplete / corrupt export: an ExportError
    (one line, exit 2) naming the file, not a FileNotFoundError / JSONDecodeError traceback."""
    import shutil

    from mmpretrain.evaluation import cli as eval_cli

    _, out = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    if damage == "no_preprocessing":
        (broken / "preprocessing.json").unlink()
        name, what = "preprocessing.json", "missing"
    elif damage == "preprocessing_lacks_std":
        pre = json.loads((broken / "preprocessing.json").read_text())
        del pre["std"]
        (broken / "preprocessing.json").write_text(json.dumps(pre))
        name, what = "preprocessing.json", "missing std"
    else:
        (broken / "config.json").write_text('{"format": "mmpretrain-export/1", "model": {')
        name, what = "config.json", "not valid JSON"
    with pytest.raises(ExportError, match=f"{name}.*{what}") as e:
        load_pretrained(broken)
    assert str(broken / name) in str(e.value)
    (tmp_path / "x-000000.tar").touch()  # the shards exist: the export is what fails
    rc = eval_cli.main(["--checkpoint", str(broken), "--shards", str(tmp_path / "x-*.tar"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and name in err and what in err, err
    assert not (tmp_path / "o").exists()


def test_export_help_does_not_import_torch():
    """`mmpretrain export --help` (through the dispatcher, as `python -m mmpretrain export --help`)
    prints every option without importing torch or the export's libraries (the package's names are
    imported on first use: every other test here resolves them)."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from mmpretrain.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        rc = main(['export', '--help'])\n"
        "    except SystemExit as e:\n"
        "        rc = e.code\n"
        "assert rc in (0, None), rc\n"
        "text = out.getvalue()\n"
        "assert 'usage: mmpretrain export' in text and '--checkpoint' in text and '--force' in text, text\n"
        "heavy = [m for m in ('torch', 'transformers', 'timm', 'safetensors', 'sentence_transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import mmpretrain.export as e\n"
        "assert {'export_checkpoint', 'load_pretrained', 'ExportError'} <= set(e.__all__) and 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_image_pool_max_exports_as_timms_max_pool(shards, tmp_path):
    """model.image_pool=max (unified): the timm tower pools with global_pool='max' over every token
    ([CLS] included) and reproduces embed_images; the export's own verify step passed too."""
    import timm

    out = export_checkpoint(make_checkpoint(tmp_path / "run", shards, extra=["model.image_pool=max"]), tmp_path / "out")
    cfg = json.loads((out / "image_encoder" / "config.json").read_text())
    assert cfg["model_args"]["global_pool"] == "max" and cfg["model_args"]["pool_include_prefix"] is True
    vit = timm.create_model(f"local-dir:{out / 'image_encoder'}", pretrained=True).eval()
    p = load_pretrained(out)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, emb = p.model.encode_image(x)
        torch.testing.assert_close(F.normalize(vit(x), dim=-1), emb, rtol=0, atol=1e-6)
        mean_emb = F.normalize(p.model.backbone.image_proj.proj(p.model.encode_image(x)[0].mean(1)), dim=-1)
    assert (emb - mean_emb).abs().max() > 1e-3  # it really is the max, not the mean
