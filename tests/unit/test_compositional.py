"""Compositional test and ITM accuracy on hard negatives (mmpretrain.evaluation.compositional):
the scene and caption plan in the sample json, one-change captions that differ only in the
intended words and only where the change is valid, the scoring (an oracle gets 100 %, a
constant model the documented tie value), and `mmpretrain eval` writing the new metrics.

The 2-process equality of the whole metrics.json, these metrics included, is checked by
tests/distributed/test_eval_distributed.py."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from difflib import SequenceMatcher
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from _exportutil import make_checkpoint, make_shards

from mmpretrain.config import load_config
from mmpretrain.data import synthetic
from mmpretrain.data.synthetic import COLORS, RELATIONS, SHAPES, SIZES, CaptionPlan, Mention, render_caption
from mmpretrain.evaluation import cli
from mmpretrain.evaluation import compositional as comp
from mmpretrain.evaluation.compositional import KINDS, caption_holds, make_variants, pairwise_accuracy
from mmpretrain.evaluation.evaluate import HeldOut, embed_heldout, quality_metrics

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


COLOR_WORD = {w: name for name, (_, words) in COLORS.items() for w in words}
SHAPE_WORD = {w: name for name, words in SHAPES.items() for w in words}
SIZE_WORD = {w: name for name, (_, words) in SIZES.items() for w in words}
_alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
OBJECT_RE = re.compile(rf"\b(an?) (?:({_alt(SIZE_WORD)}) )?({_alt(COLOR_WORD)}) ({_alt(SHAPE_WORD)})\b")


def _samples(n_images: int = 300, seed: int = 5):
    """(key, sample json as the shards hold it, caption) of synthetic held-out captions."""
    out = []
    for i in range(n_images):
        _, meta, captions, plans = synthetic.make_sample_plans(seed, "val", i, 32, 2)
        for c, (caption, plan) in enumerate(zip(captions, plans)):
            sample = json.loads(json.dumps({**meta, "caption_plan": plan.to_json()}))
            out.append((f"val-{i:08d}_{c}", sample, caption))
    return out


def _diff(a: str, b: str) -> tuple[list[str], list[str]]:
    """The tokens of ``a`` and of ``b`` outside their common parts (lower case)."""
    ta, tb = _TOKEN_RE.findall(a.lower()), _TOKEN_RE.findall(b.lower())
    old, new = [], []
    for op, i1, i2, j1, j2 in SequenceMatcher(a=ta, b=tb, autojunk=False).get_opcodes():
        if op != "equal":
            old += ta[i1:i2]
            new += tb[j1:j2]
    return old, new


# ----------------------------------------------------------------------------- the json

def test_scene_and_caption_plan_round_trip_through_the_shards(tmp_path):
    synthetic.generate(str(tmp_path), num_samples=4, num_val=6, samples_per_shard=5, image_size=32,
                       train_tokenizer=False)
    keys = [f"val-{i:08d}_{c}" for i in range(6) for c in range(2)] + [f"train-{i:08d}" for i in range(4)]
    metas = comp.read_metadata([str(p) for p in sorted(tmp_path.glob("*.tar"))], keys)
    assert sorted(metas) == sorted(keys)
    captions = {}
    for p in sorted(tmp_path.glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".txt"):
                    captions[m.name[:-4]] = tf.extractfile(m).read().decode("utf-8")
    for key, meta in metas.items():
        assert comp.has_scene(meta)
        plan = CaptionPlan.from_json(meta["caption_plan"])
        assert render_caption(plan) == captions[key]  # the plan is the caption's, word for word
        assert CaptionPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
        assert caption_holds(plan, meta["objects"])
        assert {m.object for m in plan.mentions} == set(range(len(meta["objects"])))  # every object named
        assert len(json.dumps(meta["caption_plan"])) < 700  # small
        # what the json holds of the scene: enough to check any caption against it
        for o in meta["objects"]:
            assert {"shape", "color", "size", "row", "col", "position"} <= set(o)
    # the same sample from make_sample (images and captions as before) and make_sample_plans
    jpeg, meta, caps = synthetic.make_sample(0, "val", 3, 32, 2)
    jpeg2, meta2, caps2, plans = synthetic.make_sample_plans(0, "val", 3, 32, 2)
    assert (jpeg, meta, caps) == (jpeg2, meta2, caps2) and [render_caption(p) for p in plans] == caps


# ----------------------------------------------------------------------------- the variants

def _mentions(caption: str) -> tuple[str, list[tuple[str, str | None, str, str]]]:
    """The caption with every object mention replaced by <obj>, and the mentions
    (article, size word, colour word, shape word) in order."""
    found = [m.groups() for m in OBJECT_RE.finditer(caption.lower())]
    return OBJECT_RE.sub("<obj>", caption.lower()), found


def test_changed_captions_differ_only_in_the_intended_words():
    seen = Counter()
    for key, meta, caption in _samples():
        objects = meta["objects"]
        skeleton, mentions = _mentions(caption)
        assert len(mentions) == len(objects)
        for kind, changed in make_variants(meta, key).items():
            seen[kind] += 1
            assert changed != caption
            skeleton2, mentions2 = _mentions(changed)
            assert len(mentions2) == len(mentions), (caption, changed)
            differ = [i for i, (m, m2) in enumerate(zip(mentions, mentions2)) if m[1:] != m2[1:]]
            if kind == "relation_flip":  # the mentions stay, one relation word changes
                assert mentions2 == mentions
                old, new = _diff(caption, changed)
                assert len(old) == len(new) == 1 and {old[0], new[0]} in (
                    {"left", "right"}, {"above", "below"}, {"over", "under"}, {"beneath", "above"}), (caption, changed)
                continue
            assert skeleton2 == skeleton, (caption, changed)  # nothing outside the mentions changes
            if kind == "shape_replace":  # one mention, only its shape word: a shape not in the scene
                (i,) = differ
                assert mentions2[i][:3] == mentions[i][:3], (caption, changed)
                assert SHAPE_WORD[mentions2[i][3]] not in {o["shape"] for o in objects}
                continue
            i, j = differ  # two mentions exchange one word (the article follows it)
            field = {"color_swap": 2, "size_swap": 1}[kind]
            for x, y in ((i, j), (j, i)):
                assert mentions2[x][field] == mentions[y][field], (caption, changed)
                assert [w for f, w in enumerate(mentions2[x]) if f not in (0, field)] == \
                    [w for f, w in enumerate(mentions[x]) if f not in (0, field)], (caption, changed)
            assert mentions[i][field] is not None and mentions[j][field] is not None
    assert all(seen[k] > 20 for k in KINDS), seen


def test_each_kind_applies_only_where_valid():
    for key, meta, caption in _samples(200):
        plan = CaptionPlan.from_json(meta["caption_plan"])
        objects = meta["objects"]
        kinds = make_variants(meta, key)
        colours = {objects[m.object]["color"] for m in plan.mentions}
        sized = [objects[m.object]["size"] for m in plan.mentions if m.size is not None]
        assert ("relation_flip" in kinds) == (plan.relation is not None)
        assert "shape_replace" in kinds  # at most 4 of the 8 shapes are in a scene
        if len(colours) < 2:
            assert "color_swap" not in kinds
        if len(set(sized)) < 2:  # sizes swap only between two objects whose sizes are both named
            assert "size_swap" not in kinds
        assert make_variants(meta, key) == kinds  # deterministic

    def meta_of(objects, template, mentions, relation=None):
        return {"objects": objects,
                "caption_plan": CaptionPlan(template, mentions, relation).to_json()}

    red_circle = {"shape": "circle", "color": "red", "size": "small", "row": 0, "col": 0, "position": "top left"}
    blue_circle = {"shape": "circle", "color": "blue", "size": "small", "row": 2, "col": 2, "position": "bottom right"}
    red_square = {"shape": "square", "color": "red", "size": "large", "row": 0, "col": 2, "position": "top right"}
    # same shape, sizes equal or not named, no positions: swapping the colours says the same thing
    listed = meta_of([red_circle, blue_circle], "{0} and {1} on a black background",
                     [Mention(0, None, "red", "circle"), Mention(1, "small", "blue", "circle")])
    assert set(make_variants(listed)) == {"shape_replace"}
    # ... but with a stated relation (or positions) the swap is false: offered
    related = meta_of([red_circle, blue_circle], "{0} {r} {1} on a black background",
                      [Mention(0, None, "red", "circle"), Mention(1, None, "blue", "circle")],
                      {"subject": 0, "object": 1, "relation": "left", "words": "left of"})
    v = make_variants(related)
    assert v["color_swap"] == "A blue circle left of a red circle on a black background."
    assert v["relation_flip"] == "A red circle right of a blue circle on a black background."
    assert "size_swap" not in v
    # one colour: no colour swap; different sizes, both named: size swap
    same_colour = meta_of([red_circle, red_square], "{0} and {1} on a black background",
                          [Mention(0, "small", "crimson", "circle"), Mention(1, "big", "red", "square")])
    v = make_variants(same_colour)
    assert "color_swap" not in v and v["size_swap"] == "A big crimson circle and a small red square on a black background."
    # a plan that does not describe the scene gives nothing (metadata that does not belong together)
    wrong = meta_of([red_circle], "{0} on a black background", [Mention(0, None, "blue", "circle")])
    assert make_variants(wrong) == {} and make_variants({"objects": []}) == {}


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy([1.0, 2.0], [0.0, 1.0]) == 1.0
    assert pairwise_accuracy([0.0, 0.0], [1.0, 0.0]) == 0.25
    assert pairwise_accuracy([], []) is None


# ----------------------------------------------------------------------------- the scoring

class _TextOracle(nn.Module):
    """Scores a caption by whether it is one of the data set's own captions (the true ones):
    cosine 1 vs 0 and ITM log-odds +1 vs -1; ``constant``: every caption scores the same."""

    def __init__(self, true_ids: set[tuple], constant: bool = False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.true_ids, self.constant = true_ids, constant
        self.itm_pairs = 0

    def _truth(self, ids):
        if self.constant:
            return torch.ones(ids.shape[0])
        return torch.tensor([float(tuple(r.tolist()) in self.true_ids) for r in ids])

    def encode_text(self, ids, mask):
        t = self._truth(ids)
        return None, torch.stack([t, 1 - t], 1) + self.w

    def forward(self, pixels, ids, mask, image_ids=None, mode="features"):
        return {"image_emb": torch.tensor([[1.0, 0.0]]).repeat(ids.shape[0], 1), "text_emb": self.encode_text(ids, mask)[1]}

    def itm_logits(self, pixels, ids, mask):
        self.itm_pairs += ids.shape[0]
        if self.constant:
            return torch.zeros(ids.shape[0], 2)
        t = self._truth(ids)
        return torch.stack([-t, t], 1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("compshards"))


def _cfg(shards: Path, extra=()):
    return load_config(None, [f"data.val_shards={shards}/val-*.tar", f"data.train_shards=[{shards}/train-*.tar]",
                              "data.image_size=32", "data.max_length=32", "data.global_batch_size=8",
                              "data.num_workers=0", "eval.batch_size=5", *extra])


def _tokenizer(shards: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shards / "tokenizer"))


def test_an_oracle_gets_everything_right_and_a_constant_model_chance(shards):
    from mmpretrain.data.tokenizer import tokenize

    cfg, tok = _cfg(shards), _tokenizer(shards)
    metas = comp.read_metadata(f"{shards}/val-*.tar", [f"val-{i:08d}_{c}" for i in range(12) for c in range(2)])
    captions = [render_caption(CaptionPlan.from_json(m["caption_plan"])) for m in metas.values()]
    true_ids = {tuple(r.tolist()) for r in tokenize(tok, captions, 32)["input_ids"]}

    oracle = _TextOracle(true_ids)
    result = comp.compositional_test(embed_heldout(oracle, cfg, tok), tok, itm=True)
    assert result["num_images"] == 12 and result["chance"] == 0.5 and result["dropped_truncated"] == 0
    assert set(result["kinds"]) == set(KINDS) and sum(r["n"] for r in result["kinds"].values()) > 12
    for kind, r in result["kinds"].items():
        assert r["n"] <= 12
        if r["n"]:
            assert r["cosine_acc"] == 1.0 and r["itm_acc"] == 1.0, kind
            assert result["examples"][kind]["caption"] in captions
    json.dumps(result)  # JSON-able

    # true (image, caption) pairs already scored (the hard negatives' positives) are not scored again
    heldout = embed_heldout(oracle, cfg, tok)
    pairs_before = oracle.itm_pairs
    known = {(int(u), t): 3.0 for t, u in enumerate(heldout.data["caption_image"].tolist())}
    again = comp.compositional_test(heldout, tok, itm=True, known=known)
    assert again["kinds"] == result["kinds"]
    assert oracle.itm_pairs - pairs_before == sum(r["n"] for r in result["kinds"].values())  # changed ones only

    constant = _TextOracle(true_ids, constant=True)
    const = comp.compositional_test(embed_heldout(constant, cfg, tok), tok, itm=True)
    for r in const["kinds"].values():
        assert r["n"] == 0 or (r["cosine_acc"] == 0.5 and r["itm_acc"] == 0.5)  # every trial a tie
    no_itm = comp.compositional_test(heldout, tok, itm=False, max_images=5)
    assert all(r["itm_acc"] is None and r["n"] <= 5 for r in no_itm["kinds"].values()) and no_itm["num_images"] == 5

    # both on one embedding pass (what `mmpretrain bench quality` calls): this oracle reads only
    # the text, so it says "match" to every real caption: right on positives, wrong on negatives
    q = quality_metrics(oracle, cfg, tok)
    assert q["compositional"]["kinds"] == result["kinds"] and q["compositional"]["seconds"] >= 0
    h = q["itm_hard_negatives"]
    assert (h["num_positives"], h["positive_acc"], h["negative_acc"], h["balanced_acc"]) == (24, 1.0, 0.0, 0.5)

    # captions cut at 8 tokens: trials whose change the model cannot see are not counted
    short_cfg = _cfg(shards, ["data.max_length=8"])
    short = comp.compositional_test(embed_heldout(oracle, short_cfg, tok), tok, itm=False)
    assert short["dropped_truncated"] > 0
    assert sum(r["n"] for r in short["kinds"].values()) < sum(r["n"] for r in result["kinds"].values())


class _PairOracle(nn.Module):
    """ITM that knows which caption belongs to which image: the image index is written into the
    first pixel, the caption index into the second token. ``answer``: 'oracle', 'constant'
    (logits tie) or 'always' (always says match)."""

    def __init__(self, caption_image: list[int], answer: str):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.caption_image, self.answer = caption_image, answer
        self.pairs_scored = 0

    def itm_logits(self, pixels, ids, mask):
        from mmpretrain.data.transforms import normalize

        self.pairs_scored += ids.shape[0]
        zero = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), [0.5] * 3, [0.5] * 3)[0, 0, 0, 0]
        step = normalize(torch.ones(1, 3, 1, 1, dtype=torch.uint8), [0.5] * 3, [0.5] * 3)[0, 0, 0, 0] - zero
        image = ((pixels[:, 0, 0, 0] - zero) / step).round().long().tolist()
        match = torch.tensor([float(self.caption_image[int(t)] == u) for u, t in zip(image, ids[:, 1].tolist())])
        if self.answer == "constant":
            return torch.zeros(len(image), 2)
        if self.answer == "always":
            return torch.tensor([[0.0, 1.0]]).repeat(len(image), 1)
        return torch.stack([1 - match, match], 1)


def _heldout(model, cfg, n_img: int = 4, caps_per_image: int = 2):
    torch.manual_seed(0)
    caption_image = [u for u in range(n_img) for _ in range(caps_per_image)]
    n = len(caption_image)
    image_emb = torch.nn.functional.normalize(torch.randn(n_img, 8), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.randn(n, 8), dim=-1)
    ids = torch.zeros(n, 6, dtype=torch.long)
    ids[:, 1] = torch.arange(n)
    data = {"keys": [f"k{t:03d}" for t in range(n)], "captions": [f"c{t}" for t in range(n)],
            "text_emb": text_emb, "input_ids": ids, "attention_mask": torch.ones(n, 6, dtype=torch.long),
            "caption_image": torch.tensor(caption_image), "image_emb": image_emb,
            "image_ids": [1000 + u for u in range(n_img)], "owner": [0] * n_img}
    pixels = {1000 + u: torch.full((3, 4, 4), u, dtype=torch.uint8) for u in range(n_img)}
    return HeldOut(model, cfg, None, data, pixels), caption_image, image_emb @ text_emb.t()


def test_itm_hard_negatives_mines_the_hardest_wrong_pairs_and_scores_them():
    cfg = load_config(None, ["data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "eval.batch_size=3",
                             "data.image_size=4"])
    caption_image = [u for u in range(4) for _ in range(2)]

    def run(answer, known=None, config=cfg):
        model = _PairOracle(caption_image, answer)
        heldout, _, cos = _heldout(model, config)
        return model, cos, comp.itm_hard_negatives(heldout, known=known)

    model, cos, r = run("oracle")
    n_img, n = cos.shape
    own = torch.tensor(caption_image).unsqueeze(0) == torch.arange(n_img).unsqueeze(1)
    masked = cos.masked_fill(own, float("-inf"))
    want_neg = {(u, int(masked[u].argmax())) for u in range(n_img)} | {(int(masked[:, t].argmax()), t) for t in range(n)}
    assert r["num_positives"] == n and r["num_negatives"] == len(want_neg)
    assert r["positive_acc"] == r["negative_acc"] == r["balanced_acc"] == 1.0
    assert model.pairs_scored == n + len(want_neg)
    r = run("constant")[2]
    assert r["positive_acc"] == r["negative_acc"] == r["balanced_acc"] == 0.5  # ties count 0.5
    r = run("always")[2]
    assert (r["positive_acc"], r["negative_acc"], r["balanced_acc"]) == (1.0, 0.0, 0.5)
    # scores already known (the re-ranking's) are not computed again; the new ones are added
    known = {p: (1.0 if caption_image[p[1]] == p[0] else -1.0) for p in sorted(want_neg)[:3]}
    model, _, r = run("oracle", known)
    assert r["balanced_acc"] == 1.0 and model.pairs_scored == n + len(want_neg) - 3
    assert len(known) == n + len(want_neg)
    # no trained ITM head: skipped with a reason
    assert set(run("oracle", config=load_config(None, ["loss.itm_weight=0"]))[2]) == {"skipped"}


# ----------------------------------------------------------------------------- `mmpretrain eval`

def _strip_scenes(src: Path, dst: Path) -> None:
    """Copies of the held-out shards whose json has no scene (as real, non-synthetic data)."""
    dst.mkdir()
    for p in sorted(src.glob("val-*.tar")):
        with tarfile.open(p) as tin, tarfile.open(dst / p.name, "w") as tout:
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                if m.name.endswith(".json"):
                    meta = json.loads(data)
                    meta.pop("caption_plan"), meta.pop("objects")
                    data = json.dumps(meta).encode()
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))


def test_eval_command_writes_the_compositional_metrics(shards, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "run", shards)
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(ckpt), "--shards", f"{shards}/val-*.tar", "eval.num_examples=0"]
    assert cli.main(argv + ["--out", str(out)]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert metrics == json.loads((out / "metrics.json").read_text())
    c = metrics["compositional"]
    assert c["num_images"] == 12 and c["chance"] == 0.5 and set(c["kinds"]) == set(KINDS)
    for r in c["kinds"].values():
        assert 0 <= r["n"] <= 12
        assert r["n"] == 0 or (0.0 <= r["cosine_acc"] <= 1.0 and 0.0 <= r["itm_acc"] <= 1.0)
    assert c["kinds"]["shape_replace"]["n"] > 0
    h = metrics["itm_hard_negatives"]
    assert h["num_positives"] == 24 and h["num_negatives"] >= 12
    assert 0.0 <= h["balanced_acc"] <= 1.0
    assert h["balanced_acc"] == pytest.approx((h["positive_acc"] + h["negative_acc"]) / 2)
    page = (out / "report.html").read_text()
    assert "Compositional test" in page and "ITM on held-out hard negatives" in page and "chance (%)" in page
    assert f"{100 * h['balanced_acc']:.1f}" in page and "note:" not in captured.err

    # held-out shards without scene metadata: skipped, with a one-line note; switched off: absent
    plain = tmp_path / "plain"
    _strip_scenes(shards, plain)
    assert cli.main(["--checkpoint", str(ckpt), "--shards", f"{plain}/val-*.tar", "--out", str(tmp_path / "e2"),
                     "eval.num_examples=0"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert set(metrics["compositional"]) == {"skipped"} and "balanced_acc" in metrics["itm_hard_negatives"]
    notes = [line for line in captured.err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "compositional" in notes[0] and "scene metadata" in notes[0]
    assert "Not run:" in (tmp_path / "e2" / "report.html").read_text()
    assert cli.main(argv + ["eval.compositional=false", "eval.itm_hard_negatives=false", "eval.report=false",
                            "--out", str(tmp_path / "e3")]) == 0
    metrics = json.loads((tmp_path / "e3" / "metrics.json").read_text())
    assert "compositional" not in metrics and "itm_hard_negatives" not in metrics
