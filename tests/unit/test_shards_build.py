"""`mmpretrain shards build`: every source format, bad images, resume, errors (tiny data)."""

from __future__ import annotations

import csv
import io
import json
import struct
import sys
import types
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmpretrain.data import build as build_module
from mmpretrain.data.build import BuildOptions, build
from mmpretrain.data.cli import main


# ------------------------------------------------------------------------------------ helpers
def save_image(path: Path, size=(24, 16), colour=(200, 40, 40), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the data would not decode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def read_shards(out: Path, name: str = "data") -> list[dict]:
    files = sorted(str(p) for p in out.glob(f"{name}-*.tar"))
    return list(wds.WebDataset(files, shardshuffle=False).decode("pil")) if files else []


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def make_folder(root: Path, n: int) -> Path:
    for i in range(n):
        save_image(root / f"img{i:02d}.jpg", colour=(10 * i, 100, 200))
        (root / f"img{i:02d}.txt").write_text(f"caption number {i}\n")
    return root


# -------------------------------------------------------------------------------- bad images
def test_folder_converts_or_skips_bad_images_and_counts_them(tmp_path):
    src = tmp_path / "src"
    save_image(src / "a_big.jpg", size=(300, 120))
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(src / "b_cmyk.jpg")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(src / "c_16bit.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    for x in range(4):  # left half: palette index 0 = transparent
        for y in range(8):
            pal.putpixel((x, y), 0)
    pal.save(src / "d_palette_alpha.png", transparency=0)
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 120, 0)).save(good, "JPEG")
    (src / "e_truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (src / "f_text.jpg").write_text("this is not an image")
    (src / "g_huge.png").write_bytes(png_header_only(30000, 30000))
    save_image(src / "h_no_caption.jpg")
    for stem in ("a_big", "b_cmyk", "c_16bit", "d_palette_alpha", "e_truncated", "f_text", "g_huge"):
        (src / f"{stem}.txt").write_text(f"photo {stem}")
    out = tmp_path / "out"

    manifest = build(BuildOptions("folder", str(src), str(out), samples_per_shard=3, max_side=100, workers=2))

    entry = manifest["splits"]["data"]
    assert entry["complete"] and entry["num_samples"] == 4
    assert manifest["skipped"] == {"decode_error": 1, "missing_caption": 1, "not_an_image": 1, "too_large": 1}
    assert entry["converted"] == {"16bit": 1, "cmyk": 1, "palette": 1}
    assert [s["num_samples"] for s in entry["shards"]] == [3, 1, 0]
    named = sorted(entry["skipped_files"])  # each skipped file named with its reason
    assert [n.split(":", 1)[0] for n in named] == ["decode_error", "missing_caption", "not_an_image", "too_large"]
    for stem in ("e_truncated.jpg", "h_no_caption.jpg", "f_text.jpg", "g_huge.png"):
        assert sum(stem in n for n in named) == 1, (stem, named)
    samples = {s["txt"]: s for s in read_shards(out)}
    assert set(samples) == {"photo a_big", "photo b_cmyk", "photo c_16bit", "photo d_palette_alpha"}
    for s in samples.values():
        assert s["jpg"].mode == "RGB" and s["json"]["source"] == "folder"
        assert list(s["jpg"].size) == [s["json"]["width"], s["json"]["height"]]
    big = samples["photo a_big"]
    assert big["jpg"].size == (100, 40) and (big["json"]["orig_width"], big["json"]["orig_height"]) == (300, 120)
    assert big["json"]["image_id"] == "a_big"
    assert max(abs(a - b) for a, b in zip(samples["photo c_16bit"]["jpg"].getpixel((4, 4)), (156,) * 3)) <= 3
    cmyk = samples["photo b_cmyk"]["jpg"].getpixel((10, 5))
    assert cmyk[0] > 200 and cmyk[1] < 40 and cmyk[2] < 40
    pal_rgb = samples["photo d_palette_alpha"]["jpg"]
    assert min(pal_rgb.getpixel((1, 4))) > 230  # transparent -> white
    assert pal_rgb.getpixel((6, 4))[2] > 200 and pal_rgb.getpixel((6, 4))[0] < 50
    assert not list(out.glob("*.tmp"))


# ------------------------------------------------------------------------------- csv / jsonl
def test_csv_and_jsonl_with_relative_and_separate_image_roots(tmp_path):
    save_image(tmp_path / "imgs" / "x.jpg", colour=(0, 0, 250))
    save_image(tmp_path / "imgs" / "y.png", fmt="PNG")
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image", "Caption", "extra"])
        w.writerows([["imgs/x.jpg", "a blue picture", "1"], ["imgs/y.png", "a red picture", "2"],
                     ["imgs/missing.jpg", "gone", "3"], ["imgs/x.jpg", "", "4"]])
    out = tmp_path / "csv_out"
    assert main(["build", "--format", "csv", "--input", str(tmp_path / "caps.csv"), "--out", str(out),
                 "--workers", "0"]) == 0
    samples = read_shards(out)
    assert [s["txt"] for s in samples] == ["a blue picture", "a red picture"]
    assert samples[0]["json"]["image_id"] == "imgs/x.jpg" and "jpg" in samples[1]  # png re-encoded to jpg
    assert manifest_of(out)["skipped"] == {"missing_caption": 1, "missing_image": 1}

    lines = [{"image": "x.jpg", "caption": ["one", "two"], "image_id": 7}, {"image": "y.png", "caption": "three"},
             {"image": "nope.jpg", "caption": "four"}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out2 = tmp_path / "jsonl_out"
    assert main(["build", "--format", "jsonl", "--input", str(tmp_path / "caps.jsonl"), "--images",
                 str(tmp_path / "imgs"), "--out", str(out2), "--name", "mine", "--workers", "0"]) == 0
    samples = read_shards(out2, "mine")
    assert [(s["txt"], s["json"]["image_id"]) for s in samples] == [("one", 7), ("two", 7), ("three", "y.png")]
    assert manifest_of(out2)["splits"]["mine"]["skipped"] == {"missing_image": 1}


# --------------------------------------------------------------------------- coco / flickr30k
def test_coco_five_captions_per_image_share_the_coco_image_id(tmp_path):
    save_image(tmp_path / "val2017" / "000000000139.jpg")
    save_image(tmp_path / "val2017" / "000000000285.jpg", colour=(0, 200, 0))
    annotations = [{"id": 100 + k, "image_id": iid, "caption": f"image {iid} caption {k}"}
                   for iid in (285, 139) for k in (4, 3, 2, 1, 0)]
    annotations.append({"id": 999, "image_id": 5, "caption": "an image that is not listed"})
    coco = {"images": [{"id": 285, "file_name": "000000000285.jpg"}, {"id": 139, "file_name": "000000000139.jpg"}],
            "annotations": annotations}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(coco))
    out = tmp_path / "coco"
    manifest = build(BuildOptions("coco", str(tmp_path / "captions_val2017.json"), str(out), name="val",
                                  images=str(tmp_path / "val2017"), samples_per_shard=3, workers=0))
    samples = read_shards(out, "val")
    assert len(samples) == 10 and manifest["splits"]["val"]["num_samples"] == 10
    assert Counter(s["json"]["image_id"] for s in samples) == {139: 5, 285: 5}
    assert [s["json"]["image_id"] for s in samples] == [139] * 5 + [285] * 5  # sorted by image id
    assert [s["txt"] for s in samples[:5]] == [f"image 139 caption {k}" for k in (0, 1, 2, 3, 4)]
    assert all(s["json"]["source"] == "coco" for s in samples)
    assert manifest["skipped"] == {"missing_image": 1}
    assert len({s["__key__"] for s in samples}) == 10


def test_flickr30k_karpathy_split_selection(tmp_path):
    images = []
    for i, split in enumerate(["train", "val", "test", "restval"]):
        save_image(tmp_path / "flickr" / f"{i}.jpg")
        images.append({"filename": f"{i}.jpg", "imgid": i, "split": split,
                       "sentences": [{"raw": f"{split} one"}, {"raw": f"{split} two"}]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    out = tmp_path / "f30k"
    assert main(["build", "--format", "flickr30k", "--input", str(tmp_path / "dataset_flickr30k.json"),
                 "--images", str(tmp_path / "flickr"), "--split", "train,restval", "--out", str(out),
                 "--workers", "0"]) == 0
    samples = read_shards(out)
    assert [s["txt"] for s in samples] == ["train one", "train two", "restval one", "restval two"]
    assert [s["json"]["image_id"] for s in samples] == [0, 0, 3, 3]
    assert samples[0]["json"]["split"] == "train" and samples[0]["json"]["source"] == "flickr30k"


# ---------------------------------------------------------------------- webdataset re-sharding
def test_reshard_img2dataset_style_tars(tmp_path):
    src = tmp_path / "img2dataset"
    src.mkdir()
    n = 0
    for shard in range(2):
        with wds.TarWriter(str(src / f"{shard:05d}.tar")) as sink:
            for j in range(3):
                fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][j]
                buf = io.BytesIO()
                Image.new("RGB", (40, 20), (50 * j, 80, 120)).save(buf, format=fmt)
                key = f"{shard:05d}{j:04d}"
                sample = {"__key__": key, ext: buf.getvalue(),
                          "json": {"key": key, "url": f"http://example.com/{n}.jpg", "status": "success"}}
                if not (shard == 1 and j == 2):
                    sample["txt"] = f"caption {n}"
                sink.write(sample)
                n += 1
    out = tmp_path / "resharded"
    manifest = build(BuildOptions("webdataset", str(src), str(out), samples_per_shard=4, workers=0))
    assert [s["num_samples"] for s in manifest["splits"]["data"]["shards"]] == [4, 1]
    assert manifest["skipped"] == {"missing_caption": 1}
    samples = read_shards(out)
    assert [s["txt"] for s in samples] == [f"caption {i}" for i in range(5)]
    exts = [next(e for e in ("jpg", "png", "webp") if e in s) for s in samples]
    assert exts == ["jpg", "png", "webp", "jpg", "png"]  # good RGB images keep their bytes
    assert samples[1]["json"]["url"] == "http://example.com/1.jpg" and samples[1]["json"]["image_id"] == "000000001"
    assert samples[4]["png"].size == (40, 20)

    # a brace pattern names the same tars; re-sharding our own output keeps image ids
    out2 = tmp_path / "again"
    build(BuildOptions("webdataset", str(src / "{00000..00001}.tar"), str(out2), samples_per_shard=10, workers=0))
    build(BuildOptions("webdataset", str(out2 / "data-*.tar"), str(tmp_path / "third"), workers=0))
    assert [s["json"]["image_id"] for s in read_shards(tmp_path / "third")] == [s["json"]["image_id"] for s in samples]


# --------------------------------------------------------------------------------------- resume
def test_interrupted_build_resumes_without_redoing_complete_shards(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src", 10)
    reference = tmp_path / "reference"
    build(BuildOptions("folder", str(src), str(reference), samples_per_shard=3, workers=0))

    real = build_module.process_image
    calls = []

    def crash_on_seventh(job):
        calls.append(job[0].path)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(job)

    out = tmp_path / "out"
    monkeypatch.setattr(build_module, "process_image", crash_on_seventh)
    with pytest.raises(KeyboardInterrupt):
        build(BuildOptions("folder", str(src), str(out), samples_per_shard=3, workers=0))
    entry = manifest_of(out)["splits"]["data"]
    assert not entry["complete"] and [s["file"] for s in entry["shards"]] == ["data-000000.tar", "data-000001.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["data-000000.tar", "data-000001.tar", "manifest.json"]
    before = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    (out / "data-000002.tar.tmp").write_bytes(b"half a shard from a killed run")

    calls.clear()
    monkeypatch.setattr(build_module, "process_image", lambda job: calls.append(job[0].path) or real(job))
    assert main(["build", "--format", "folder", "--input", str(src), "--out", str(out),
                 "--samples-per-shard", "3", "--workers", "0"]) == 0
    assert [Path(p).name for p in calls] == ["img06.jpg", "img07.jpg", "img08.jpg", "img09.jpg"]
    assert {p: (out / p).stat().st_ino for p in before} == before  # complete shards untouched
    assert manifest_of(out)["splits"]["data"]["complete"]
    assert sorted(p.name for p in out.glob("data-*")) == [f"data-{i:06d}.tar" for i in range(4)]
    for i in range(4):  # same bytes as the uninterrupted build
        name = f"data-{i:06d}.tar"
        assert (out / name).read_bytes() == (reference / name).read_bytes()

    # other input in the same output: refused unless --overwrite
    (src / "img10.jpg").write_bytes((src / "img00.jpg").read_bytes())
    (src / "img10.txt").write_text("new")
    with pytest.raises(ValueError, match="--overwrite"):
        build(BuildOptions("folder", str(src), str(out), samples_per_shard=3, workers=0))
    manifest = build(BuildOptions("folder", str(src), str(out), samples_per_shard=3, workers=0, overwrite=True))
    assert manifest["splits"]["data"]["num_samples"] == 11


# --------------------------------------------------------------------------------------- errors
def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmpretrain shards: ") and len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_line_errors_naming_file_and_field(tmp_path, capsys):
    out = str(tmp_path / "out")
    (tmp_path / "nocap.csv").write_text("image,label\na.jpg,cat\n")
    err = _error(capsys, ["build", "--format", "csv", "--input", str(tmp_path / "nocap.csv"), "--out", out])
    assert "nocap.csv" in err and "caption" in err and "image, label" in err

    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n{"image": oops}\n')
    err = _error(capsys, ["build", "--format", "jsonl", "--input", str(tmp_path / "bad.jsonl"), "--out", out])
    assert "bad.jsonl:2" in err

    (tmp_path / "coco.json").write_text(json.dumps({"images": []}))
    err = _error(capsys, ["build", "--format", "coco", "--input", str(tmp_path / "coco.json"), "--out", out])
    assert "coco.json" in err and "'annotations'" in err

    (tmp_path / "k.json").write_text(json.dumps({"images": []}))
    err = _error(capsys, ["build", "--format", "flickr30k", "--input", str(tmp_path / "k.json"), "--split", "dev",
                          "--out", out])
    assert "--split" in err and "'dev'" in err

    err = _error(capsys, ["build", "--format", "folder", "--input", str(tmp_path / "absent"), "--out", out])
    assert "absent" in err
    assert main(["build", "--format", "tiff", "--input", "x", "--out", out]) == 2  # argparse usage error
    assert "invalid choice: 'tiff'" in capsys.readouterr().err

    make_folder(tmp_path / "empty_caps", 1)
    (tmp_path / "empty_caps" / "img00.txt").write_text("  \n")
    err = _error(capsys, ["build", "--format", "folder", "--input", str(tmp_path / "empty_caps"), "--out", out])
    assert "no usable" in err and "missing_caption=1" in err


def test_stats_is_dispatched_to_its_module(monkeypatch):
    seen = []
    fake = types.ModuleType("mmpretrain.data.stats")
    fake.main = lambda argv: seen.append(argv) or 5
    monkeypatch.setitem(sys.modules, "mmpretrain.data.stats", fake)
    import mmpretrain.data as data_pkg

    monkeypatch.setattr(data_pkg, "stats", fake, raising=False)
    assert main(["stats", "shards/x", "--json"]) == 5
    assert seen == [["shards/x", "--json"]]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_caption_file_with_bad_utf8_fails_in_one_line_naming_file_and_line(tmp_path, capsys, fmt):
    save_image(tmp_path / "x.jpg")
    good = "image,caption\nx.jpg,a picture\n" if fmt == "csv" else '{"image": "x.jpg", "caption": "a picture"}\n'
    bad = b"x.jpg,caf\xe9 au lait\n" if fmt == "csv" else b'{"image": "x.jpg", "caption": "caf\xe9"}\n'
    src = tmp_path / f"caps.{fmt}"
    src.write_bytes(b"\xef\xbb\xbf" + good.encode() + bad)
    assert main(["build", "--format", fmt, "--input", str(src), "--out", str(tmp_path / "out"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = 3 if fmt == "csv" else 2
    assert len(err) == 1 and f"caps.{fmt}:{line}: not valid UTF-8 (byte 0xe9" in err[0], err


def test_img2dataset_status_is_honoured_when_resharding_and_loading(tmp_path):
    from mmpretrain.data import stream
    from mmpretrain.data.transforms import BadSample

    src = tmp_path / "img2dataset"
    src.mkdir()
    with wds.TarWriter(str(src / "00000.tar")) as sink:
        for j, status in enumerate(["success", "failed_to_download", "success"]):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (40 * j, 80, 120)).save(buf, format="JPEG")
            sink.write({"__key__": f"{j:09d}", "jpg": buf.getvalue(), "txt": f"caption {j}",
                        "json": {"key": f"{j:09d}", "status": status}})
    out = tmp_path / "out"
    manifest = build(BuildOptions("webdataset", str(src), str(out), workers=0))
    assert manifest["skipped"] == {"failed_download": 1}
    assert [s["txt"] for s in read_shards(out)] == ["caption 0", "caption 2"]
    bad = {"__key__": "k", "jpg": b"x", "txt": b"a cat", "json": b'{"status": "failed_to_resize"}'}
    with pytest.raises(BadSample, match="failed_to_resize") as e:
        stream.check_sample(bad, 10**6)
    assert e.value.reason == "failed_download"


def test_build_names_the_first_skipped_files_and_counts_all(tmp_path, capsys):
    src = tmp_path / "src"
    save_image(src / "images" / "ok.jpg")
    rows = [["image", "caption"], ["images/ok.jpg", "a good one"]]
    rows += [[f"images/gone_{i:02d}.jpg", f"lost {i}"] for i in range(13)] + [["", "no image cell"]]
    with open(src / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "out"
    assert main(["build", "--format", "csv", "--input", str(src / "captions.csv"), "--out", str(out),
                 "--workers", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  skipped: missing_image=14" in lines
    named = [ln.strip() for ln in lines if ln.startswith("    ")]
    assert len(named) == 10 and all(n.startswith("missing_image: ") for n in named)
    assert named[0].endswith("gone_00.jpg: no such file") and "gone_09.jpg" in named[9]
    assert any("the first 10 named" in ln for ln in lines)
    assert manifest_of(out)["splits"]["data"]["skipped_files"] == named


def test_csv_input_that_does_not_fit_says_what_was_expected(tmp_path, capsys):
    out = str(tmp_path / "out")
    folder = make_folder(tmp_path / "photos", 2)
    err = _error(capsys, ["build", "--format", "csv", "--input", str(folder), "--out", out])
    assert "photos: a directory; --format csv --input expects a .csv/.tsv file" in err
    assert "image,caption" in err and "--format folder" in err
    (folder / "captions.csv").write_text("image,caption\nimg00.jpg,x\n")
    assert "here: captions.csv" in _error(capsys, ["build", "--format", "csv", "--input", str(folder), "--out", out])
    err = _error(capsys, ["build", "--format", "csv", "--input", str(tmp_path / "nope.csv"), "--out", out])
    assert "nope.csv: no such file; --format csv --input expects" in err and "caption" in err
    (tmp_path / "headerless.csv").write_text("img00.jpg,a caption\n")
    err = _error(capsys, ["build", "--format", "csv", "--input", str(tmp_path / "headerless.csv"), "--out", out])
    assert "no image column in the header row" in err and "e.g. 'image,caption'" in err
    err = _error(capsys, ["build", "--format", "jsonl", "--input", str(folder), "--out", out])
    assert "--format jsonl --input expects a .jsonl file" in err
