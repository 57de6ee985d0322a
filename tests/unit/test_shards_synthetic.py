"""`mmpretrain shards synthetic`: determinism, caption/drawing agreement, shard layout."""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mmpretrain.data import synthetic
from mmpretrain.data.cli import main
from mmpretrain.data.config import DataConfig
from mmpretrain.data.synthetic import BACKGROUNDS, COLORS, RELATIONS, SHAPES, SIZES, make_sample


COLOR_WORD = {w: name for name, (_, words) in COLORS.items() for w in words}
SHAPE_WORD = {w: name for name, words in SHAPES.items() for w in words}
SIZE_WORD = {w: name for name, (_, words) in SIZES.items() for w in words}
_alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
# "[size] colour shape": every object mention
OBJECT_RE = re.compile(rf"\b(?:({_alt(SIZE_WORD)}) )?({_alt(COLOR_WORD)}) ({_alt(SHAPE_WORD)})\b")
RELATION_RE = re.compile(
    rf"({OBJECT_RE.pattern}) ({_alt([w for ws in RELATIONS.values() for w in ws])}) an? ({OBJECT_RE.pattern})"
)
RELATION_WORD = {w: name for name, words in RELATIONS.items() for w in words}


def _mentions(caption: str):
    found = OBJECT_RE.finditer(caption.lower())
    return [(COLOR_WORD[m.group(2)], SHAPE_WORD[m.group(3)], SIZE_WORD.get(m.group(1))) for m in found]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    kw = dict(num_samples=12, num_val=4, samples_per_shard=5, train_tokenizer=False)
    synthetic.generate(str(tmp_path / "a"), seed=3, **kw)
    synthetic.generate(str(tmp_path / "b"), seed=3, **kw)
    synthetic.generate(str(tmp_path / "c"), seed=4, **kw)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert sorted(a) == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar", "val-000001.tar"]
    assert a == b
    assert all(a[name] != c[name] for name in a)
    # the held-out split is its own seed stream: image i of val is not image i of train
    train = [make_sample(3, "train", i, 64, 1)[2][0] for i in range(20)]
    val = [make_sample(3, "val", i, 64, 1)[2][0] for i in range(20)]
    assert sum(t == v for t, v in zip(train, val)) == 0


def test_captions_name_exactly_the_drawn_objects():
    relations_seen = 0
    for i in range(300):
        _, meta, (caption,) = make_sample(11, "train", i, 64, 1)
        objects = meta["objects"]
        assert 1 <= len(objects) <= 4
        mentions = _mentions(caption)
        # binding: the (colour, shape) pairs named are exactly the drawn ones, each once
        assert Counter((c, s) for c, s, _ in mentions) == Counter((o["color"], o["shape"]) for o in objects), caption
        by_pair = {(o["color"], o["shape"]): o for o in objects}
        for colour, shape, size in mentions:
            assert size is None or size == by_pair[(colour, shape)]["size"], caption
        # the background colour named is the drawn one
        assert any(w in caption.lower() for w in BACKGROUNDS[meta["background"]][1]), caption
        # single objects: the position named is the drawn cell
        if len(objects) == 1:
            o = objects[0]
            row, col = ("top", "middle", "bottom")[o["row"]], ("left", "center", "right")[o["col"]]
            text = caption.lower()
            if o["row"] == 1 and o["col"] == 1:
                assert "center" in text or "middle" in text, caption
            else:
                assert (row in text or o["row"] == 1) and (col in text or o["col"] == 1), caption
                others = ({"top", "bottom"} - {row}) | ({"left", "right"} - {col})
                assert not any(f" {w}" in text for w in others), caption
        # relations ("a left of b", "a above b") hold for the drawn cells
        for m in RELATION_RE.finditer(caption.lower()):
            relations_seen += 1
            a = by_pair[(COLOR_WORD[m.group(3)], SHAPE_WORD[m.group(4)])]
            b = by_pair[(COLOR_WORD[m.group(8)], SHAPE_WORD[m.group(9)])]
            rel = RELATION_WORD[m.group(5)]
            holds = {"left": a["col"] < b["col"], "right": a["col"] > b["col"],
                     "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[rel]
            assert holds, (caption, a, b)
    assert relations_seen > 30  # the relation templates are exercised


def test_pixels_show_the_objects_in_their_colours():
    palette = {name: rgb for name, (rgb, _) in COLORS.items()}
    for i in range(60):
        jpeg, meta, _ = make_sample(5, "train", i, 64, 1)
        image = Image.open(io.BytesIO(jpeg))
        assert image.format == "JPEG" and image.size == (64, 64) and image.mode == "RGB"
        candidates = {**palette, "_bg": BACKGROUNDS[meta["background"]][0]}
        for o in meta["objects"]:
            if o["shape"] == "ring":  # hollow: the centre shows the background
                continue
            pixel = image.getpixel((int(o["center"][0]), int(o["center"][1])))
            nearest = min(candidates, key=lambda n: math.dist(candidates[n], pixel))
            assert nearest == o["color"], (i, o, pixel)


def test_held_out_captions_are_distinct_and_fit_the_token_budget():
    captions = []
    for i in range(1000):
        _, _, (first, second) = make_sample(0, "val", i, 64, 2)
        assert first != second  # two wordings of one image
        captions += [first, second]
    duplicates = len(captions) - len(set(captions))
    assert duplicates / len(captions) < 0.02
    # no caption is cut by the default max_length (objects named at the end would be lost)
    assert synthetic.MAX_CAPTION_TOKENS <= DataConfig().max_length
    assert max(synthetic.count_tokens(c) for c in captions) <= synthetic.MAX_CAPTION_TOKENS
    assert synthetic.count_tokens("A red plus sign, a tan box.") == 2 + 9


def test_cli_writes_webdataset_shards_manifest_and_tokenizer(tmp_path, monkeypatch):
    import webdataset as wds

    import mmpretrain.data.tokenizer as tokenizer_module

    calls = []
    real = tokenizer_module.train_tokenizer

    def recording(captions, out_dir, vocab_size):
        calls.append((list(captions), out_dir, vocab_size))
        return real(captions, out_dir, vocab_size)

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", recording)
    out = tmp_path / "synthetic"
    rc = main(["synthetic", "--out", str(out), "--num-samples", "30", "--num-val", "8", "--seed", "1",
               "--samples-per-shard", "16", "--image-size", "48", "--vocab-size", "300"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "mmpretrain-shards/1"
    assert manifest["splits"]["train"]["num_samples"] == 30
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [16, 14]
    assert manifest["splits"]["val"]["num_samples"] == 16
    assert manifest["skipped"] == {}

    train = list(wds.WebDataset(str(out / "train-{000000..000001}.tar"), shardshuffle=False).decode("pil"))
    val = list(wds.WebDataset(str(out / "val-000000.tar"), shardshuffle=False).decode("pil"))
    assert len(train) == 30 and len(val) == 16
    keys = [s["__key__"] for s in train + val]
    assert len(set(keys)) == len(keys)
    for s in train + val:
        assert s["jpg"].size == (48, 48)
        assert s["json"]["source"] == "synthetic" and s["json"]["width"] == 48 and s["json"]["height"] == 48
        assert Counter((o["color"], o["shape"]) for o in s["json"]["objects"]) == Counter(
            (c, sh) for c, sh, _ in _mentions(s["txt"]))
    per_image = Counter(s["json"]["image_id"] for s in val)
    assert len(per_image) == 8 and set(per_image.values()) == {2}
    assert len({s["json"]["image_id"] for s in train}) == 30

    # the tokenizer is trained on the train captions only and saved as DIR/tokenizer/
    assert len(calls) == 1
    captions, out_dir, vocab_size = calls[0]
    assert sorted(captions) == sorted(s["txt"] for s in train)
    assert Path(out_dir) == out / "tokenizer" and vocab_size == 300
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    for s in train:
        ids = tok(s["txt"])["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) == synthetic.count_tokens(s["txt"])


def test_rerun_with_fewer_samples_leaves_no_stale_shards(tmp_path):
    synthetic.generate(str(tmp_path), num_samples=9, num_val=2, samples_per_shard=3, train_tokenizer=False)
    assert len(list(tmp_path.glob("train-*.tar"))) == 3
    synthetic.generate(str(tmp_path), num_samples=4, num_val=0, samples_per_shard=3, train_tokenizer=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train"} and manifest["splits"]["train"]["num_samples"] == 4


@pytest.mark.parametrize("flag,value", [("--num-samples", "0"), ("--image-size", "8")])
def test_cli_rejects_bad_settings(tmp_path, capsys, flag, value):
    argv = ["synthetic", "--out", str(tmp_path), "--num-samples", "5", "--no-tokenizer", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmpretrain shards: ") and flag in err and len(err.splitlines()) == 1
