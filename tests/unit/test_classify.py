"""Zero-shot classification (mmpretrain/evaluation/classify.py, `mmpretrain eval --classify`):
the accuracy math on hand-made scores, a stub model whose embeddings and ITM head are known,
ImageFolder and shard inputs, one-line errors, the synthetic labelled split, and one real run of
the command on a saved tiny checkpoint."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from _exportutil import make_checkpoint, make_shards

from mmpretrain.config import load_config
from mmpretrain.data import synthetic
from mmpretrain.evaluation import classify as C
from mmpretrain.evaluation import cli


# ----------------------------------------------------------------------------- pure math

def test_top1_top5_per_class_and_pessimistic_ties():
    classes = [f"c{i}" for i in range(7)]
    # image 0 (class 0): its class first; image 1 (class 0): 2nd; image 2 (class 1): 6th (outside
    # the top 5); image 3 (class 2): tied with one wrong class -> the tie counts against it (2nd)
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0],
        [0.5, 0.1, 0.9, 0.0, 0.0, 0.0, 0.0],
        [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.2],
        [0.0, 0.7, 0.7, 0.0, 0.0, 0.0, 0.0],
    ])
    labels = torch.tensor([0, 0, 1, 2])
    m = C.accuracy_metrics(scores, labels, classes)
    assert m["top1"] == pytest.approx(25.0)
    assert m["top5"] == pytest.approx(75.0)
    assert m["per_class"]["c0"] == {"n": 2, "top1": pytest.approx(50.0), "top5": pytest.approx(100.0)}
    assert m["per_class"]["c1"] == {"n": 1, "top1": 0.0, "top5": 0.0}
    assert m["per_class"]["c2"] == {"n": 1, "top1": 0.0, "top5": pytest.approx(100.0)}
    assert m["per_class"]["c3"] == {"n": 0, "top1": None, "top5": None}
    assert m["mean_per_class"] == pytest.approx((50.0 + 0.0 + 0.0) / 3)  # classes with images only
    assert C.chance(8) == {"chance_top1": 12.5, "chance_top5": 62.5}
    assert C.chance(3)["chance_top5"] == 100.0


def test_class_embedding_is_the_normalised_mean_of_normalised_templates():
    e = torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0], [3.0, 3.0]])  # 2 classes x 2 templates
    out = C.class_embeddings(e, 2, 2)
    s = 2 ** -0.5
    assert torch.allclose(out, torch.tensor([[s, s], [s, s]], dtype=torch.float64))
    assert torch.allclose(out.norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_itm_rescoring_reorders_only_the_top_k():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    # the re-scorer prefers the candidate of highest index; class 3 is outside the top 2
    new, cand = C.rescore_topk(scores, 2, lambda cand: cand.double())
    assert cand.tolist() == [[0, 1]]
    assert torch.argsort(new[0], descending=True).tolist() == [1, 0, 2, 3]


def test_prompts_and_templates(tmp_path):
    assert C.render_prompt("a {} on a plain background.", "circle") == "a circle on a plain background."
    assert C.render_prompt("a photo of a {}.", "orange") == "a photo of an orange."
    assert C.render_prompt("A {} shape.", "ice cream") == "An ice cream shape."
    f = tmp_path / "t.txt"
    f.write_text("# mine\na {}.\n\nan image of a {}.\n")
    assert C.read_templates([str(f), "there is a {}."]) == ["a {}.", "an image of a {}.", "there is a {}."]
    with pytest.raises(C.ClassifyError, match="exactly once"):
        C.check_templates(["no slot here"])


# ----------------------------------------------------------------------------- a stub model

RGB = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (35, 75, 225)}


class StubModel(torch.nn.Module):
    """Image embedding: the mean RGB of the image, centred; text embedding: the sum of one-hot
    colour-word rows (so "a red {}" points at red images); ITM: +``prefer`` log-odds for texts
    holding the word ``blue``, 0 otherwise."""

    def __init__(self, tokenizer, prefer: float = 10.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.model_cfg = type("M", (), {"itm_contrastive_prior": False})()
        self.tokenizer = tokenizer
        self.prefer = prefer
        self.itm_calls = 0

    def encode_image(self, pixels):
        # normalised pixels: the channel means order colours as the raw RGB does
        emb = pixels.float().mean(dim=(2, 3))
        return None, emb - emb.mean(dim=1, keepdim=True)

    def encode_text(self, ids, mask):
        emb = torch.full((ids.shape[0], 3), 1e-3)
        for r, words in enumerate(self._words(ids)):
            for c, colour in enumerate(RGB):
                emb[r, c] += float(colour in words)
        return None, emb

    def _words(self, ids):  # the words of each text (the small test vocabulary splits words)
        return [re.findall(r"[a-z]+", self.tokenizer.decode(row, skip_special_tokens=True).lower())
                for row in ids.tolist()]

    def itm_logits(self, pixels, ids, mask):
        self.itm_calls += ids.shape[0]
        has_blue = torch.tensor([float("blue" in w) for w in self._words(ids)]) * self.prefer
        return torch.stack([torch.zeros_like(has_blue), has_blue], dim=1)

    def logit_scale(self):
        return torch.tensor(100.0)


def _jpeg(rgb, size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tiny synthetic shards (the export tests' helper) with a small labelled split."""
    d = make_shards(tmp_path_factory.mktemp("clsshards"))
    synthetic.write_classify_split(d, 32, image_size=32, samples_per_shard=20)
    return d


@pytest.fixture(scope="module")
def tokenizer(shards):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shards / "tokenizer"))


def _folder(root: Path, layout: dict[str, list[str]]) -> Path:
    for cls, colours in layout.items():
        (root / cls).mkdir(parents=True)
        for i, colour in enumerate(colours):
            (root / cls / f"{i}.jpg").write_bytes(_jpeg(RGB[colour]))
    return root


def _cfg(extra=()):
    return load_config(None, ["data.image_size=16", "data.max_length=16", "eval.batch_size=4", *extra])


def test_stub_model_on_an_image_folder_gives_the_known_accuracy(tmp_path, tokenizer):
    # red: 2 red images + 1 blue one (mislabelled); green: 2 green; blue: 1 blue
    root = _folder(tmp_path / "colours", {"red": ["red", "red", "blue"], "green": ["green", "green"],
                                          "blue": ["blue"]})
    data = C.load_classify_set(root)
    assert data.format == "imagefolder" and data.classes == ["blue", "green", "red"] and len(data.images) == 6
    model = StubModel(tokenizer)
    cfg = _cfg(["eval.classify_itm_k=2", "eval.itm_rerank_score=itm", "eval.classify_itm_prompts=mean"])
    r = C.zero_shot(model, cfg, None, tokenizer, data, templates=["a {} circle.", "an image of a {} square."])
    assert r["num_images"] == 6 and r["num_classes"] == 3 and r["chance_top1"] == pytest.approx(100 / 3)
    assert r["top1"] == pytest.approx(500 / 6)  # all but the blue image in red/
    assert r["per_class"]["red"]["top1"] == pytest.approx(200 / 3)
    assert r["per_class"]["green"]["top1"] == 100.0 and r["per_class"]["blue"]["top1"] == 100.0
    assert r["mean_per_class"] == pytest.approx((200 / 3 + 100 + 100) / 3)
    assert r["top5"] == 100.0
    # the probe on the stub's embeddings (4 folds of 6 images) is reported and printed
    assert r["linear_probe"]["folds"] >= 1 and r["linear_probe"]["top1"] is not None
    assert "linear probe" in C.format_table(r)
    # ITM (alone) prefers "blue" among each image's top 2: blue wins wherever it is a candidate
    itm = r["itm"]
    assert itm["k"] == 2 and itm["score"] == "itm" and itm["prompts"] == "mean"
    assert model.itm_calls == 6 * 2 * 2  # images x candidates x templates
    # each image's top 2 by cosine holds blue (red and green images: their own class, then blue,
    # which is nearer to both than the third colour), so ITM alone answers blue everywhere
    assert itm["per_class"] == {"blue": {"n": 1, "top1": 100.0, "top5": 100.0},
                                "green": {"n": 2, "top1": 0.0, "top5": 100.0},
                                "red": {"n": 3, "top1": 0.0, "top5": 100.0}}
    assert itm["top1"] == pytest.approx(100 / 6) and itm["top5"] == 100.0
    s = _stub_scores(tokenizer, ["a {} circle."])  # rows: blue, green, red images
    assert torch.topk(s, 2).indices.sort(dim=1).values.tolist() == [[0, 1], [0, 1], [0, 2]]


def test_linear_probe_separates_what_the_features_hold_and_not_what_they_do_not():
    g = torch.Generator().manual_seed(0)
    n, c = 400, 4
    labels = torch.arange(n) % c
    centres = torch.randn(c, 16, generator=g) * 3
    feats = centres[labels] + torch.randn(n, 16, generator=g) * 0.5  # the class is in the features
    seen = C.linear_probe(feats, labels, c)
    assert seen["folds"] == 4 and seen["top1"] == 100.0
    noise = torch.randn(n, 16, generator=g)  # nothing about the class
    blind = C.linear_probe(noise, labels, c)
    assert 10.0 < blind["top1"] < 45.0  # chance 25 %
    assert C.linear_probe(feats, labels, c) == seen  # deterministic
    assert C.linear_probe(feats[:3], torch.tensor([0, 0, 0]), 1)["top1"] is None  # no fold with 2 classes


def _stub_scores(tokenizer, templates):
    """Cosines of each pure colour image against the stub's class embeddings (blue, green, red)."""
    model = StubModel(tokenizer)
    from mmpretrain.data.tokenizer import tokenize
    from mmpretrain.data.transforms import eval_transform, normalize

    cfg = _cfg()
    prompts = [C.render_prompt(t, c) for c in ("blue", "green", "red") for t in templates]
    tok = tokenize(tokenizer, prompts, 16)
    txt = model.encode_text(tok["input_ids"], tok["attention_mask"])[1]
    cls = C.class_embeddings(txt, 3, len(templates)).float()
    px = torch.stack([eval_transform(_jpeg(RGB[c]), 16) for c in ("blue", "green", "red")])
    img = torch.nn.functional.normalize(model.encode_image(normalize(px, cfg.data.mean, cfg.data.std))[1], dim=1)
    return img @ cls.t()


def test_stub_itm_plus_itc_and_best_prompt_on_shards(tmp_path, tokenizer):
    """Shards with a ``label`` field; ITM+ITC: the contrastive logit (scale 100) outweighs a
    small ITM preference, so the result equals the contrastive one; with a large preference
    blue wins wherever it is among the top k."""
    import webdataset as wds

    d = tmp_path / "wds"
    d.mkdir()
    colours = ["red", "green", "blue", "red", "blue", "green", "green", "red", "blue", "green"]
    with wds.TarWriter(str(d / "set-000000.tar")) as w:
        for i, c in enumerate(colours):
            w.write({"__key__": f"s{i:03d}", "jpg": _jpeg(RGB[c]), "txt": "x",
                     "json": json.dumps({"label": c}).encode()})
    data = C.load_classify_set(d)
    assert data.format == "shards" and data.classes == ["blue", "green", "red"] and data.templates is None
    templates = ["a {} circle."]
    # eval.batch_size=1: chunks of 8 images, so the 10 images take two
    small = C.zero_shot(StubModel(tokenizer, prefer=0.5), _cfg(["eval.classify_itm_k=3", "eval.batch_size=1"]),
                        None, tokenizer, data, templates=templates)
    assert small["top1"] == 100.0 and small["itm"]["top1"] == 100.0 and small["itm"]["score"] == "itm+itc"
    model = StubModel(tokenizer, prefer=1e4)
    big = C.zero_shot(model, _cfg(["eval.classify_itm_k=3", "eval.classify_itm_prompts=best"]), None, tokenizer,
                      data, templates=templates + ["an image of a {}."])
    assert model.itm_calls == len(colours) * 3  # best prompt: one pass per candidate
    assert big["itm"]["top1"] == pytest.approx(30.0)  # k = every class: blue (3 of 10) always wins
    assert big["itm"]["per_class"]["blue"]["top1"] == 100.0
    # the default template set when neither the config nor the dataset names one
    plain = C.zero_shot(StubModel(tokenizer), _cfg(["eval.classify_itm_k=0"]), None, tokenizer, data)
    assert plain["templates"] == list(C.DEFAULT_TEMPLATES) and plain["templates_from"] == "default"
    assert plain["itm"] == {"skipped": "eval.classify_itm_k=0"}


# ----------------------------------------------------------------------------- inputs and errors

def test_imagefolder_names_nested_files_and_max_images(tmp_path):
    root = tmp_path / "f"
    (root / "pickup_truck" / "sub").mkdir(parents=True)
    (root / "cat").mkdir()
    (root / "pickup_truck" / "sub" / "a.PNG").write_bytes(_jpeg(RGB["red"]))
    (root / "pickup_truck" / "b.jpeg").write_bytes(_jpeg(RGB["red"]))
    (root / "pickup_truck" / "notes.txt").write_text("not an image")
    (root / "cat" / "c.jpg").write_bytes(_jpeg(RGB["green"]))
    data = C.load_classify_set(root)
    assert data.classes == ["cat", "pickup truck"] and data.labels == [0, 1, 1]
    assert data.keys == ["cat/c.jpg", "pickup_truck/b.jpeg", "pickup_truck/sub/a.PNG"]
    assert len(C.load_classify_set(root, max_images=2).images) == 2


def test_synthetic_shards_patterns_and_manifest_templates(shards):
    d = shards / "classify"
    data = C.load_classify_set(d)
    assert data.classes == list(synthetic.SHAPES) and data.templates == synthetic.CLASSIFY_TEMPLATES["label"]
    assert len(data.images) == 32
    by_color = C.load_classify_set(str(d / "classify-{000000..000001}.tar"), label_field="color")
    assert by_color.classes == list(synthetic.COLORS) and len(by_color.images) == 32
    one = C.load_classify_set(str(d / "classify-000000.tar"))
    assert len(one.images) == 20


@pytest.mark.parametrize("make, field, message", [
    (lambda p: p.mkdir(), "label", "empty directory"),
    (lambda p: (p.mkdir(), (p / "x.txt").write_text("x")), "label", "no class folders"),
    (lambda p: (p.mkdir(), (p / "a").mkdir(), (p / "b").mkdir(), (p / "a" / "1.jpg").write_bytes(_jpeg((1, 2, 3)))),
     "label", "class folder holds no image"),
    (lambda p: (p.mkdir(), (p / "only").mkdir(), (p / "only" / "1.jpg").write_bytes(_jpeg((1, 2, 3)))),
     "label", "needs at least 2"),
    (None, "nolabel", "no sample has an image and a json field 'nolabel'"),
    (lambda p: None, "label", "no such directory, and no .tar shards match it"),
])
def test_bad_input_is_one_line_naming_the_path(tmp_path, shards, make, field, message):
    if make is None:
        path = shards / "classify"
    else:
        path = tmp_path / "in"
        make(path)
    with pytest.raises(C.ClassifyError) as info:
        C.load_classify_set(path, field)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_the_synthetic_root_points_at_its_labelled_split(shards):
    with pytest.raises(C.ClassifyError, match="the labelled split is .*classify"):
        C.load_classify_set(shards)


def test_non_string_label_and_single_labelled_class(tmp_path):
    import webdataset as wds

    for name, labels, message in (("ints", [0, 1], "not a class-name string"),
                                  ("same", ["a", "a"], "needs at least 2")):
        d = tmp_path / name
        d.mkdir()
        with wds.TarWriter(str(d / "x-000000.tar")) as w:
            for i, label in enumerate(labels):
                w.write({"__key__": f"k{i}", "jpg": _jpeg((9, 9, 9)), "json": json.dumps({"label": label}).encode()})
        with pytest.raises(C.ClassifyError, match=message):
            C.load_classify_set(d)


# ----------------------------------------------------------------------------- synthetic split

def _tars(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def test_synthetic_split_is_deterministic_and_leaves_train_val_unchanged(tmp_path):
    kw = dict(num_samples=6, num_val=3, samples_per_shard=4, image_size=32, train_tokenizer=False)
    synthetic.generate(str(tmp_path / "plain"), **kw)
    synthetic.generate(str(tmp_path / "a"), num_classify=24, **kw)
    synthetic.generate(str(tmp_path / "b"), num_classify=24, **kw)
    plain, a, b = tmp_path / "plain", tmp_path / "a", tmp_path / "b"
    assert _tars(a) == _tars(plain) and (a / "manifest.json").read_bytes() == (plain / "manifest.json").read_bytes()
    assert _tars(a / "classify") and _tars(a / "classify") == _tars(b / "classify")
    assert (a / "classify" / "manifest.json").read_bytes() == (b / "classify" / "manifest.json").read_bytes()
    assert not (plain / "classify").exists()
    samples = [synthetic.make_classify_sample(0, i, 32) for i in range(24)]
    for i, (_, meta, caption, _) in enumerate(samples):
        (obj,) = meta["objects"]
        assert meta["label"] == obj["shape"] == list(synthetic.SHAPES)[(i + i // 40) % 8]
        assert meta["color"] == obj["color"] == list(synthetic.COLORS)[i % 10]
        assert any(w in caption.lower() for w in synthetic.SHAPES[obj["shape"]])
    # every 80 consecutive images hold each (shape, colour) pair once
    labels = [synthetic.make_classify_sample(0, i, 16)[1] for i in range(80)]
    assert len({(m["label"], m["color"]) for m in labels}) == 80
    # its own seed stream: not the train images of the same index
    train = [synthetic.make_sample(0, "train", i, 32, 1)[0] for i in range(24)]
    assert all(s[0] != t for s, t in zip(samples, train))
    # the command line writes it by default and 0 removes it
    from mmpretrain.data.cli import main

    assert main(["synthetic", "--out", str(a), "--num-samples", "6", "--num-val", "3", "--samples-per-shard", "4",
                 "--image-size", "32", "--no-tokenizer", "--num-classify", "0"]) == 0
    assert not _tars(a / "classify") and _tars(a) == _tars(plain)


# ----------------------------------------------------------------------------- the command

def test_eval_classify_command_on_a_saved_checkpoint(shards, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "run", shards)
    out = tmp_path / "eval"
    rc = cli.main(["--checkpoint", str(ckpt), "--classify", str(shards / "classify"), "--label-field",
                   "label,color", "--out", str(out), "eval.compositional=false", "eval.itm_hard_negatives=false"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    metrics = json.loads(lines[-1])
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert "mean_recall" in metrics  # the retrieval evaluation ran too
    zs = metrics["zero_shot"]
    assert set(zs) == {"label", "color"}
    assert json.loads((out / "zero_shot.json").read_text())["zero_shot"] == zs
    for field, n_classes in (("label", 8), ("color", 10)):
        r = zs[field]
        assert r["num_images"] == 32 and r["num_classes"] == n_classes and r["templates_from"] == "dataset"
        assert r["chance_top1"] == pytest.approx(100 / n_classes)
        assert 0 <= r["top1"] <= r["top5"] <= 100
        assert sum(v["n"] for v in r["per_class"].values()) == 32
        assert "top1" in r["itm"] and r["itm"]["k"] == 5
    assert any(line.startswith("zero-shot classification:") for line in lines)
    html = (out / "report.html").read_text()
    assert "Zero-shot classification" in html and f"{zs['color']['top1']:.1f}" in html
    # --classify-only with a template from the command line; the report still shows it
    out2 = tmp_path / "only"
    rc = cli.main(["--checkpoint", str(ckpt), "--classify", str(shards / "classify"), "--classify-only",
                   "--templates", "a {}.", "--out", str(out2), "eval.classify_itm_k=0"])
    assert rc == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert "mean_recall" not in m2 and m2["zero_shot"]["label"]["templates"] == ["a {}."]
    assert m2["zero_shot"]["label"]["templates_from"] == "command line"
    html2 = (out2 / "report.html").read_text()
    assert "Zero-shot classification" in html2 and "Recall (%)" not in html2
    # bad input: one line naming the path, exit 2
    capsys.readouterr()
    rc = cli.main(["--checkpoint", str(ckpt), "--classify", str(tmp_path / "missing"), "--out", str(out2)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(tmp_path / "missing") in err[0]
