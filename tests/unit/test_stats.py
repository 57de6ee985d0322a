"""`mmpretrain shards stats`: counts, skip reasons, pixel mean/std, caption token lengths."""

from __future__ import annotations

import io
import json

from PIL import Image

from _shardutil import write_raw_shard
from mmpretrain.data.stats import main
from mmpretrain.data.tokenizer import train_tokenizer


def _solid_png(colour, size=(20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_stats_reports_counts_pixels_and_lengths(tmp_path, capsys):
    caps = ["a red square", "red square on the left of a big blue circle near the top"]
    samples = []
    for i in range(6):
        colour = (255, 0, 0) if i % 2 == 0 else (0, 0, 255)  # half red, half blue
        samples.append({"__key__": f"k{i}", "png": _solid_png(colour), "txt": caps[i % 2],
                        "json": {"image_id": i}})
    samples.append({"__key__": "nocap", "png": _solid_png((0, 0, 0))})
    samples.append({"__key__": "broken", "jpg": b"garbage", "txt": "x"})
    write_raw_shard(str(tmp_path / "data-000000.tar"), samples)
    tok = train_tokenizer(caps * 3, str(tmp_path / "tok"), 80)
    lens = [len(tok(c)["input_ids"]) for c in caps]
    assert lens[0] < 8 < lens[1]

    rc = main([str(tmp_path), "--tokenizer", str(tmp_path / "tok"), "--max-length", "8", "--image-size", "8"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(out[-1])
    assert stats["samples"] == 6
    assert stats["skipped"] == {"missing_caption": 1, "corrupt_image": 1}
    for got, want in zip(stats["pixel_mean"], [0.5, 0.0, 0.5]):
        assert abs(got - want) < 1e-3
    for got, want in zip(stats["pixel_std"], [0.5, 0.0, 0.5]):
        assert abs(got - want) < 1e-3
    ct = stats["caption_tokens"]
    assert ct["max"] == lens[1] and ct["mean"] == sum(lens) / 2
    assert stats["truncated_share"] == 0.5


def test_stats_no_shards_is_an_error(tmp_path, capsys):
    pattern = str(tmp_path / "none-*.tar")
    assert main([pattern, "--tokenizer", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"mmpretrain shards stats: no shards match {pattern}"]  # not a tokenizer complaint


def test_unreadable_shards_are_named_not_silently_ignored(tmp_path, capsys, caplog):
    import logging
    import os

    caps = ["a red square", "a blue circle"]
    write_raw_shard(str(tmp_path / "data-000000.tar"),
                    [{"__key__": f"k{i}", "png": _solid_png((255, 0, 0)), "txt": caps[i % 2]} for i in range(4)])
    (tmp_path / "data-000001.tar").write_bytes(b"")
    (tmp_path / "data-000002.tar").write_bytes(os.urandom(4096))
    (tmp_path / "data-000003.tar").write_text("not a tar, just text\n" * 40)
    tok = train_tokenizer(caps * 3, str(tmp_path / "tok"), 60)
    with caplog.at_level(logging.WARNING, logger="mmpretrain.data"):
        assert main([str(tmp_path), "--tokenizer", str(tmp_path / "tok"), "--image-size", "8"]) == 0
    out = capsys.readouterr().out
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["shards"] == 4 and stats["samples"] == 4
    bad = {os.path.basename(u): why for u, why in stats["unreadable_shards"].items()}
    assert set(bad) == {"data-000001.tar", "data-000002.tar", "data-000003.tar"}
    assert bad["data-000001.tar"] == "empty file (0 bytes)" and "not a readable tar" in bad["data-000002.tar"]
    assert out.count("unreadable shard (no sample read):") == 3
    assert sum("unreadable shard" in r.getMessage() for r in caplog.records) == 3


def test_each_split_is_reported_apart_then_the_total(tmp_path, capsys):
    """A directory with train/val shards and a labelled subdirectory (as `shards synthetic`
    writes DIR/classify/): one block per split, the JSON holds each split and the totals."""
    caps = ["a red square", "a blue circle"]
    write_raw_shard(str(tmp_path / "train-000000.tar"),
                    [{"__key__": f"t{i}", "png": _solid_png((255, 0, 0)), "txt": caps[0]} for i in range(4)])
    write_raw_shard(str(tmp_path / "train-000001.tar"),
                    [{"__key__": f"u{i}", "png": _solid_png((255, 0, 0)), "txt": caps[0]} for i in range(2)]
                    + [{"__key__": "nocap", "png": _solid_png((0, 0, 0))}])
    write_raw_shard(str(tmp_path / "val-000000.tar"),
                    [{"__key__": f"v{i}", "png": _solid_png((0, 0, 255)), "txt": caps[1]} for i in range(2)])
    (tmp_path / "classify").mkdir()
    (tmp_path / "classify" / "manifest.json").write_text("{}")
    write_raw_shard(str(tmp_path / "classify" / "classify-000000.tar"),
                    [{"__key__": f"c{i}", "png": _solid_png((0, 255, 0)), "txt": "green"} for i in range(3)])
    tok = train_tokenizer(caps * 3 + ["green"], str(tmp_path / "tok"), 60)
    assert main([str(tmp_path), "--tokenizer", str(tmp_path / "tok"), "--image-size", "8"]) == 0
    out = capsys.readouterr().out
    stats = json.loads(out.strip().splitlines()[-1])
    splits = stats["splits"]
    assert set(splits) == {"train", "val", "classify"}
    assert [splits[k]["samples"] for k in ("train", "val", "classify")] == [6, 2, 3] and stats["samples"] == 11
    assert splits["train"]["shards"] == 2 and splits["train"]["skipped"] == {"missing_caption": 1}
    assert splits["val"]["pixel_mean"] == [0.0, 0.0, 1.0] and splits["classify"]["pixel_mean"] == [0.0, 1.0, 0.0]
    assert abs(stats["pixel_mean"][0] - 6 / 11) < 1e-4 and stats["skipped_total"] == 1
    assert "split train: shards: 2  samples read: 6  skipped: 1 (missing_caption=1)" in out
    assert out.index("split train:") < out.index("split val:") < out.index("split classify:") < out.index("all 3 splits:")
