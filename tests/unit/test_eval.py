"""Evaluation in one process: the command's outputs, ITM re-ranking against a brute-force ITM
matrix, the report, one-line errors. Two gloo processes: tests/distributed/test_eval_distributed.py;
the trainer's evaluation at the end of a run: tests/e2e/test_trainer_runs.py."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
import torch

from _exportutil import make_checkpoint, make_shards, tiny_overrides

from mmpretrain.config import load_config
from mmpretrain.evaluation import cli
from mmpretrain.evaluation.evaluate import run_evaluation
from mmpretrain.evaluation.report import render_html
from mmpretrain.evaluation.retrieval import retrieval_metrics
from mmpretrain.export import load_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a checkpoint and a metrics.jsonl, plus its shards."""
    root = tmp_path_factory.mktemp("evalrun")
    shards = make_shards(root / "shards")
    ckpt = make_checkpoint(root / "run", shards)
    with open(root / "run" / "metrics.jsonl", "w") as f:
        for step in range(1, 4):
            f.write(json.dumps({"step": step, "loss": 2.0 - 0.1 * step, "loss_itc": 1.5 - 0.1 * step,
                                "loss_itm": 0.69, "lr": 1e-4 * step}) + "\n")
        f.write(json.dumps({"step": 3, "eval": {"mean_recall": 10.0}}) + "\n")
    return shards, ckpt


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(data)).size


def test_eval_command_writes_metrics_and_report(run, tmp_path, capsys):
    shards, ckpt = run
    out = tmp_path / "eval"
    rc = cli.main(["--checkpoint", str(ckpt), "--shards", f"{shards}/val-*.tar", "--out", str(out),
                   "eval.num_examples=3"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    assert metrics == json.loads((out / "metrics.json").read_text())
    # 12 held-out images with 2 captions each: deduplicated by image id
    assert metrics["num_images"] == 12 and metrics["num_captions"] == 24 and metrics["step"] == 3
    for prefix in ("", "itm_"):
        for d in ("i2t", "t2i"):
            for k in (1, 5, 10):
                assert 0.0 <= metrics[f"{prefix}{d}_R@{k}"] <= 100.0
        assert f"{prefix}mean_recall" in metrics
    assert metrics["itm_rerank_k"] == 4 and metrics["itm_seconds"] > 0 and metrics["contrastive_seconds"] > 0

    html = (out / "report.html").read_text()
    # self-contained: no http(s) reference outside the inline base64 images (whose text may
    # happen to contain the letters "http")
    bare = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html).replace("http-equiv", "")
    assert "<img" in html and "http" not in bare
    assert f"{metrics['i2t_R@1']:.1f}" in html and f"{metrics['itm_mean_recall']:.1f}" in html
    assert html.count("class='q text-query'") == 3 and html.count("class='q image-query'") == 3
    assert "3 logged steps from" in html  # the run's metrics.jsonl was found and read
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(embedded) == 1 + 3 * 5 + 3  # the overview PNG, 3 x top-5 images, 3 query images
    assert _png_size(base64.b64decode(embedded[0])) == _png_size((out / "report.png").read_bytes())
    w, h = _png_size((out / "report.png").read_bytes())
    assert w > 600 and h > 600


def test_report_marks_right_results_green(tmp_path):
    img = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    examples = {
        "text_queries": [{"caption": "a <red> circle", "images": [img] * 5,
                          "correct": [False, True, False, False, False], "scores": [0.5, 0.4, 0.3, 0.2, 0.1]}],
        "image_queries": [{"image": img, "captions": ["a", "b", "c", "d", "e"],
                           "correct": [True, False, False, True, False], "scores": [0.9, 0.8, 0.7, 0.6, 0.5]}],
    }
    render_html(tmp_path / "r.html", {"i2t_R@1": 50.0, "t2i_R@1": 25.0, "mean_recall": 37.5}, None, examples)
    html = (tmp_path / "r.html").read_text()
    assert html.count("<img class='hit'") == 1 and html.count("<img class='miss'") == 4
    assert html.count("<li class='hit'>") == 2
    assert "a &lt;red&gt; circle" in html  # captions are escaped


def _val_samples(cfg, tokenizer):
    """Every held-out sample, read with the loader in one process (key order)."""
    from mmpretrain.data.loader import ShardLoader

    rows = []
    for b in ShardLoader(cfg.data, tokenizer, rank=0, world_size=1, seed=0, train=False):
        for j, key in enumerate(b["keys"]):
            rows.append((key, int(b["image_ids"][j]), b["pixels"][j], b["input_ids"][j], b["attention_mask"][j]))
    return sorted(rows, key=lambda r: r[0])


def test_contrastive_and_full_itm_rerank_match_brute_force(run, tmp_path, monkeypatch):
    """With itm_rerank_k >= every candidate, the re-ranked metrics are those of the full ITM
    score matrix; the contrastive ones those of the full cosine matrix (float64 model, so batch
    composition cannot flip a near-tie). Pixels go through the data package's ``normalize``."""
    from mmpretrain.data.transforms import normalize
    from mmpretrain.evaluation import evaluate as evaluate_mod

    shards, ckpt = run
    loaded = load_checkpoint(ckpt)
    model = loaded.model.double()
    cfg = load_config(None, tiny_overrides(shards, tmp_path, ["eval.itm_rerank_k=100", "eval.report=false",
                                                              "eval.batch_size=7", "data.mean=[0.4,0.5,0.6]"]))
    calls = []

    def spy(pixels, mean, std, dtype=torch.float32):
        calls.append((list(mean), list(std), dtype))
        return normalize(pixels, mean, std, dtype)

    monkeypatch.setattr(evaluate_mod, "normalize", spy)  # the one normalisation, not a copy of it
    metrics = run_evaluation(model, cfg, None, loaded.tokenizer, 0, tmp_path / "e")
    assert calls and all(c == (cfg.data.mean, cfg.data.std, torch.float64) for c in calls)
    assert metrics["itm_rerank_score"] == "itm+itc"  # the default
    cfg.eval.itm_rerank_score = "itm"
    metrics_itm = run_evaluation(model, cfg, None, loaded.tokenizer, 0, tmp_path / "e2")
    assert metrics_itm["itm_rerank_score"] == "itm"

    rows = _val_samples(cfg, loaded.tokenizer)
    image_ids = []
    for r in rows:
        if r[1] not in image_ids:
            image_ids.append(r[1])
    first = {iid: next(r for r in rows if r[1] == iid) for iid in image_ids}
    caption_image = torch.tensor([image_ids.index(r[1]) for r in rows])
    px = normalize(torch.stack([first[i][2] for i in image_ids]), cfg.data.mean, cfg.data.std, torch.float64)
    ids = torch.stack([r[3] for r in rows])
    mask = torch.stack([r[4] for r in rows])
    with torch.no_grad():
        img_emb = model.encode_image(px)[1]
        txt_emb = model.encode_text(ids, mask)[1]
        cos = img_emb.float() @ txt_emb.float().t()
        n_img, n_cap = len(image_ids), len(rows)
        logits = model.itm_logits(px.repeat_interleave(n_cap, 0), ids.repeat(n_img, 1), mask.repeat(n_img, 1)).float()
        itm = (logits[:, 1] - logits[:, 0]).view(n_img, n_cap)
        scale = float(model.logit_scale())
    ks = [1, 5, 10]
    want = retrieval_metrics(cos, caption_image, ks)
    want_itm = retrieval_metrics(itm, caption_image, ks)
    want_sum = retrieval_metrics(itm.double() + scale * cos.double(), caption_image, ks)
    for k in ks:
        for d in ("i2t", "t2i"):
            assert metrics[f"{d}_R@{k}"] == pytest.approx(want[f"{d}_R@{k}"])
            assert metrics_itm[f"itm_{d}_R@{k}"] == pytest.approx(want_itm[f"{d}_R@{k}"])
            assert metrics[f"itm_{d}_R@{k}"] == pytest.approx(want_sum[f"{d}_R@{k}"])
    # the ITM head of this random model ranks differently from the embeddings, and the sum from
    # the ITM-only rule from the sum: the test can tell the rules apart
    m = metrics_itm
    assert any(m[f"itm_{d}_median_rank"] != m[f"{d}_median_rank"] for d in ("i2t", "t2i")) or \
        m["itm_mean_recall"] != m["mean_recall"]
    assert any(metrics[f"itm_{d}_R@{k}"] != metrics_itm[f"itm_{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks) or \
        any(metrics[f"itm_{d}_median_rank"] != metrics_itm[f"itm_{d}_median_rank"] for d in ("i2t", "t2i"))


def test_eval_rejects_a_path_that_is_not_a_checkpoint(tmp_path, capsys):
    rc = cli.main(["--checkpoint", str(tmp_path), "--shards", "x-*.tar", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not an mmpretrain checkpoint" in err
    assert not (tmp_path / "o").exists()


def test_eval_of_a_run_directory_uses_its_newest_checkpoint(run, tmp_path, capsys):
    shards, ckpt = run
    rc = cli.main(["--checkpoint", str(ckpt.parent.parent), "--shards", f"{shards}/val-*.tar",
                   "--out", str(tmp_path / "o"), "eval.num_examples=1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"evaluating its newest checkpoint {ckpt}" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["step"] == 3
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    rc = cli.main(["--checkpoint", str(empty), "--shards", "x-*.tar", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "run directory with no complete checkpoint" in err


def test_eval_keys_repeated_across_shards_is_one_line_error(run, tmp_path, capsys):
    """Two shards holding the same keys: exit 2 with one line naming a repeated key and both
    shards (not a RuntimeError traceback blaming the loader)."""
    import shutil
    import tarfile

    shards, ckpt = run
    data = tmp_path / "dup"
    data.mkdir()
    first = data / "val-000000.tar"
    shutil.copy(shards / "val-000000.tar", first)
    shutil.copy(shards / "val-000001.tar", data / "val-000001.tar")
    copy = data / "val-000002.tar"
    shutil.copy(first, copy)  # every key of val-000000.tar again
    with tarfile.open(first) as tf:
        keys = {m.name.split(".", 1)[0] for m in tf.getmembers()}
    rc = cli.main(["--checkpoint", str(ckpt), "--shards", f"{data}/val-*.tar", "--out", str(tmp_path / "o"),
                   "eval.report=false"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "occurs more than once" in err and str(first) in err and str(copy) in err
    assert any(repr(k) in err for k in keys)
    assert not (tmp_path / "o").exists()


def test_default_out_dir_uses_the_trainers_step_dir_name(monkeypatch):
    from mmpretrain.export import format as checkpoint  # the one definition, which the trainer imports

    assert cli.default_out_dir(Path("r/checkpoints/step_00000007"), 7) == Path("r/eval/step_00000007")
    assert cli.default_out_dir(Path("exports/x"), 7) == Path("exports/x-eval")
    monkeypatch.setattr(checkpoint, "step_dir_name", lambda step: f"s{step}")  # one definition of the name
    assert cli.default_out_dir(Path("r/checkpoints/s7"), 7) == Path("r/eval/s7")


def test_eval_launch_mismatch_is_one_line_error(run, tmp_path, capsys, monkeypatch):
    """The launch is checked by runtime.check_accelerator, as the trainer's is: a launcher that
    claims 2 processes while Accelerate sees 1 fails with one line and exit 2, and leaves no state."""
    from accelerate.state import PartialState

    from mmpretrain import runtime

    shards, ckpt = run
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime, "launch_info", lambda: runtime.LaunchInfo(launched=True, world_size=2,
                                                                           use_deepspeed=False, has_gpu=False))
    rc = cli.main(["--checkpoint", str(ckpt), "--shards", f"{shards}/val-*.tar", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "launch check failed" in err and "WORLD_SIZE=2" in err, err
    assert not PartialState._shared_state and not (tmp_path / "o").exists()


@pytest.mark.parametrize("n_pairs", [0, 1, 11])
@pytest.mark.parametrize("prior", [False, True])
def test_towers_itm_reuses_unimodal_passes_and_equals_pairwise_itm(n_pairs, prior):
    """fusion_source=towers: each distinct image and caption takes one unimodal pass, the pairs
    only the fusion blocks; the log-odds equal ``itm_logits`` pair by pair (and the batch size
    does not matter)."""
    from mmpretrain.data.transforms import normalize
    from mmpretrain.evaluation.evaluate import itm_logodds
    from mmpretrain.models import LossConfig, ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, embed_dim=8,
                                    max_text_length=8, fusion_source="towers", fusion_depth=2,
                                    itm_contrastive_prior=prior),
                        LossConfig(), 30).eval()
    if prior:  # statistics as training leaves them: the prior moves the log-odds
        model.itm_prior_stats.copy_(torch.tensor([3.0, -1.0, 2.0]))
    cfg = load_config(None, ["data.image_size=16", "data.max_length=8", "eval.batch_size=4"])
    g = torch.Generator().manual_seed(1)
    pool = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(3)]
    images = [pool[i % 3] for i in range(n_pairs)]  # repeated images: the same tensor objects
    ids = torch.randint(5, 30, (n_pairs, 8), generator=g)
    if n_pairs:
        ids[::2] = ids[0].clone()  # repeated captions
    mask = torch.ones(n_pairs, 8, dtype=torch.long)
    mask[1::3, 5:] = 0
    got = itm_logodds(model, cfg, None, images, ids, mask)
    assert len(got) == n_pairs
    if n_pairs:
        px = normalize(torch.stack(images), cfg.data.mean, cfg.data.std, torch.float32)
        with torch.no_grad():
            want = model.itm_logits(px, ids, mask)
        torch.testing.assert_close(torch.tensor(got), (want[:, 1] - want[:, 0]), rtol=1e-5, atol=1e-5)
