"""Export: round trip, the standard-library towers, ZeRO-3 consolidation, bad input.

Checkpoints are written with the trainer's own ``save_checkpoint`` (Accelerate ``save_state`` +
``mmpretrain.json`` + ``tokenizer/``), on a tiny model over tiny synthetic shards.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import _proc

from mmpretrain.config import load_config, to_dict
from mmpretrain.export import ExportError, export_checkpoint, load_checkpoint, load_pretrained, main

TINY = ["model.image_size=32", "data.image_size=32", "model.width=32", "model.depth=2", "model.num_heads=2",
        "model.embed_dim=16", "model.patch_size=8", "data.max_length=16", "model.max_text_length=16",
        "data.batch_size=8", "data.num_workers=0", "eval.batch_size=16", "eval.itm_rerank_k=4",
        "eval.num_examples=3"]
REPO = Path(__file__).resolve().parents[1]


def make_shards(directory: Path) -> Path:
    from mmpretrain.data.synthetic import generate

    if not (directory / "manifest.json").is_file():
        generate(str(directory), num_samples=16, num_val=12, samples_per_shard=8, image_size=32, vocab_size=200)
    return directory


def tiny_overrides(shards: Path, run_dir: Path, extra=()) -> list[str]:
    return TINY + [f"data.val_shards={shards}/val-*.tar", f"data.train_shards=[{shards}/train-*.tar]",
                   f"train.output_dir={run_dir}", *extra]


def make_checkpoint(run_dir: Path, shards: Path, extra=(), step: int = 3, seed: int = 0) -> Path:
    """A single-process checkpoint of a freshly initialised tiny model whose zero-initialised
    modality-type embeddings are made non-zero (so that folding them is really tested)."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from mmpretrain.models import build_model
    from mmpretrain.trainer.checkpoint import save_checkpoint

    cfg = load_config(None, tiny_overrides(shards, run_dir, extra))
    tok = AutoTokenizer.from_pretrained(str(shards / "tokenizer"))
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.loss, len(tok))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "type_embed" in name:
                p.normal_(0.0, 0.1)
    acc = Accelerator(cpu=True)
    model = acc.prepare(model)
    meta = {"config": to_dict(cfg), "vocab_size": len(tok), "distributed_type": "NO", "zero_stage": 0,
            "world_size": 1}
    return save_checkpoint(acc, run_dir / "checkpoints", step, meta, {}, tok)


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
    assert sorted(q.name for q in out.iterdir()) >= ["config.json", "image_encoder", "model.safetensors",
                                                      "preprocessing.json", "text_encoder"]
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


def test_text_tower_loads_with_automodel_and_matches(exported):
    from transformers import AutoModel, AutoTokenizer

    _, out = exported
    bert = AutoModel.from_pretrained(str(out / "text_encoder")).eval()
    assert type(bert).__name__ == "BertModel"
    p = load_pretrained(out)
    tok = AutoTokenizer.from_pretrained(str(out))  # the export root is a tokenizer directory too
    enc = tok(["a red circle left of a blue square", "a star"], padding="max_length", max_length=16,
              truncation=True, return_tensors="pt")
    with torch.no_grad():
        got = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        want = p.model.text_inputs(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
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


def test_dual_encoder_text_tower_is_the_whole_bert(shards, tmp_path):
    from transformers import AutoModel

    from safetensors.torch import load_file

    ckpt = make_checkpoint(tmp_path / "run", shards, ["model.arch=dual_encoder", "model.fusion=linear"])
    out = export_checkpoint(ckpt, tmp_path / "out")
    assert not (out / "image_encoder").exists()  # small_cnn is not a timm model
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
    # --force with a good one replaces it as a whole
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not (tmp_path / "out.tmp").exists() and not (tmp_path / "out.old").exists()


# ----------------------------------------------------------------------------- ZeRO-3

ZERO3_SCRIPT = r'''
"""2 processes, DeepSpeed ZeRO-3 on CPU (gloo): one step, a checkpoint, the gathered live weights."""
import json, sys
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from safetensors.torch import save_file
from transformers import AutoTokenizer

from mmpretrain.config import load_config, to_dict
from mmpretrain.models import build_model
from mmpretrain.trainer.checkpoint import save_checkpoint

out, tok_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = load_config(None, overrides)
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
      "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
# no GPU: Accelerate picks no backend while DeepSpeed starts gloo -> name gloo explicitly
acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
                  kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
assert acc.num_processes == 2 and acc.distributed_type.name == "DEEPSPEED", (acc.num_processes, acc.distributed_type)
tok = AutoTokenizer.from_pretrained(tok_dir)
torch.manual_seed(0)
model = build_model(cfg.model, cfg.loss, len(tok))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, opt = acc.prepare(model, opt)
g = torch.Generator().manual_seed(acc.process_index)
s = cfg.model.image_size
pixels = torch.randn(2, 3, s, s, generator=g)
ids = torch.randint(5, len(tok), (2, cfg.data.max_length), generator=g)
loss = model(pixels, ids, torch.ones_like(ids), torch.arange(2) + 2 * acc.process_index)["loss"]
acc.backward(loss)
opt.step()
meta = {"config": to_dict(cfg), "vocab_size": len(tok), "distributed_type": "DEEPSPEED", "zero_stage": 3,
        "world_size": acc.num_processes}
ckpt = save_checkpoint(acc, f"{out}/checkpoints", 1, meta, {}, tok)
full = acc.get_state_dict(model)  # collective: gathers the ZeRO-3 partitions
if acc.is_main_process:
    save_file({k: v.float().contiguous() for k, v in full.items()}, f"{out}/live_weights.safetensors")
    print(json.dumps({"checkpoint": str(ckpt)}))
acc.wait_for_everyone()
'''


@pytest.mark.distributed
def test_zero3_two_process_checkpoint_exports_the_live_weights(shards, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "zero3_save.py"
    script.write_text(ZERO3_SCRIPT)
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(run), str(shards / "tokenizer"), *tiny_overrides(shards, run)]
    proc = _proc.run(cmd, timeout=300, env=env)
    live_file = run / "live_weights.safetensors"
    # DeepSpeed on gloo sometimes aborts at interpreter exit after finishing: judge by the outputs
    assert live_file.is_file(), proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_00000001"
    assert (ckpt / "pytorch_model").is_dir() and not (ckpt / "model.safetensors").exists()
    out = export_checkpoint(ckpt, tmp_path / "export")
    live, exported = load_file(str(live_file)), load_file(str(out / "model.safetensors"))
    assert set(live) == set(exported)
    for k in live:
        assert torch.equal(live[k].float(), exported[k]), k
    # the step moved the weights away from their initialisation (the comparison is not trivial)
    torch.manual_seed(0)
    from mmpretrain.models import build_model_from_dict

    init = build_model_from_dict(json.loads((out / "config.json").read_text())["model"]).state_dict()
    assert any(not torch.equal(init[k].float(), exported[k]) for k in exported if exported[k].is_floating_point())


def test_loading_an_export_dir_that_is_not_one(tmp_path):
    with pytest.raises(ExportError):
        load_pretrained(tmp_path)


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
    rc = eval_cli.main(["--checkpoint", str(broken), "--shards", "x-*.tar", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and name in err and what in err, err
    assert not (tmp_path / "o").exists()
