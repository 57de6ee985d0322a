"""ShardLoader: sources, balance over ranks x workers, bad samples, determinism, resume, mixing.

Ranks are simulated by constructing one ShardLoader per rank in this process; each uses real
DataLoader worker processes.
"""

from __future__ import annotations

import collections
import io
import os
import random

import pytest
import torch
from PIL import Image

from _shardutil import caption_for, jpeg_bytes, write_raw_shard, write_test_shards
from mmpretrain.data.config import DataConfig
from mmpretrain.data.loader import ShardLoader
from mmpretrain.data.plan import Piece, make_plan
from mmpretrain.data.shardio import expand_sources, stable_hash
from mmpretrain.data.tokenizer import train_tokenizer
from mmpretrain.data.transforms import BadSample, check_image_header, decode_and_crop, normalize


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer([caption_for(i) for i in range(200)], str(d), 120)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven")
    write_test_shards(str(d), 4, [13, 7, 11, 9])  # 40 samples
    return str(d)


def cfg_for(pattern, **kw) -> DataConfig:
    base = dict(train_shards=[pattern] if isinstance(pattern, str) else pattern, global_batch_size=8,
                num_workers=2, image_size=12, shuffle_buffer=8, max_length=12)
    base.update(kw)
    return DataConfig(**base)


def run_epoch(loader) -> list[dict]:
    return list(loader)


def all_ranks(cfg, tok, world=2, seed=0, **kw):
    loaders = [ShardLoader(cfg, tok, rank=r, world_size=world, seed=seed, **kw) for r in range(world)]
    return loaders, [run_epoch(ld) for ld in loaders]


# ----------------------------------------------------------------------------- sources

def test_expand_sources(uneven):
    files = sorted(os.path.join(uneven, f) for f in os.listdir(uneven) if f.endswith(".tar"))
    assert expand_sources(uneven) == files
    assert expand_sources(os.path.join(uneven, "train-*.tar")) == files
    assert expand_sources(os.path.join(uneven, "train-{000001..000002}.tar")) == files[1:3]
    assert expand_sources([files[0], "pipe:cat " + files[1]]) == [files[0], "pipe:cat " + files[1]]
    assert expand_sources(os.path.join(uneven, "nothing-*.tar")) == []


def test_reads_plain_webdataset_without_manifest_and_pipe(tmp_path, tok):
    write_test_shards(str(tmp_path), 2, 5, manifest=False, captions_per_image=5)  # counted at start-up
    files = expand_sources(str(tmp_path))
    cfg = cfg_for(["pipe:cat " + files[0], files[1]], global_batch_size=2, num_workers=0)
    ld = ShardLoader(cfg, tok, rank=0, world_size=1, seed=0, train=False, sources=cfg.train_shards)
    batches = run_epoch(ld)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == [f"{n:09d}" for n in range(10)]
    b = batches[0]
    assert b["pixels"].dtype == torch.uint8 and b["pixels"].shape == (2, 3, 12, 12)
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (2, 12)
    assert b["attention_mask"].dtype == torch.int64
    assert (b["input_ids"][:, 0] == tok.cls_token_id).all()
    for key, cap, iid in zip(b["keys"], b["captions"], b["image_ids"].tolist()):
        n = int(key)
        assert cap == caption_for(n)
        assert iid == stable_hash(f"img{n // 5}")
    # five captions per image share one image id
    ids = torch.cat([b["image_ids"] for b in batches])
    assert len(set(ids.tolist())) == 2


# ----------------------------------------------------------------------------- balance

def check_balanced(loaders, results, total):
    counts = [len(r) for r in results]
    assert len(set(counts)) == 1, counts
    assert counts[0] == loaders[0].batches_per_epoch
    keys = [k for r in results for b in r for k in b["keys"]]
    assert len(keys) == len(set(keys)), "a sample was read twice"
    lost = total - len(keys)
    global_batch = loaders[0].cfg.global_batch_size
    assert lost == loaders[0].dropped_per_epoch
    assert 0 <= lost < global_batch
    for r in results:
        for b in r:
            assert b["pixels"].shape[0] == global_batch // len(loaders)


def test_two_ranks_two_workers_one_epoch(uneven, tok):
    loaders, results = all_ranks(cfg_for(os.path.join(uneven, "train-*.tar")), tok)
    check_balanced(loaders, results, 40)
    assert len(results[0]) == 5  # 40 // 8


def test_too_few_shards_still_balanced(tmp_path, tok):
    write_test_shards(str(tmp_path), 1, 37)
    loaders, results = all_ranks(cfg_for(str(tmp_path)), tok)
    check_balanced(loaders, results, 37)
    assert len(results[0]) == 4


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_balanced_and_disjoint(seed):
    rng = random.Random(seed)
    world, workers, b = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3]), rng.choice([1, 2, 5])
    counts = [rng.randrange(0, 30) for _ in range(rng.randrange(1, 12))]
    pieces = [Piece(f"s{i}", 0, n) for i, n in enumerate(counts) if n]
    total = sum(counts)
    if total < world * b:
        return
    plan = make_plan(pieces, world_size=world, num_workers=workers, batch_per_rank=b, train=True,
                     seed=seed, epoch=0)
    per_rank = [sum(plan.batches[r * workers:(r + 1) * workers]) for r in range(world)]
    assert len(set(per_rank)) == 1 and per_rank[0] == total // (world * b)
    seen = set()
    for j, slot in enumerate(plan.slots):
        assert sum(p.count for p in slot) == plan.batches[j] * b
        for p in slot:
            for i in range(p.start, p.stop, p.stride):
                assert (p.url, i) not in seen
                seen.add((p.url, i))
    assert total - len(seen) == plan.dropped < world * b


# ----------------------------------------------------------------------------- bad samples

def _png_header_only_large() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bad"))
    write_test_shards(d, 2, 10)  # keys 0..19, listed in the manifest; 40 samples in all: none dropped
    good = jpeg_bytes(16, 16)
    meta = {"image_id": "x"}
    write_raw_shard(os.path.join(d, "train-000002.tar"), [
        {"__key__": "bad_corrupt", "jpg": b"\xff\xd8 not really a jpeg", "txt": "a cat", "json": meta},
        {"__key__": "bad_truncjpg", "jpg": jpeg_bytes(32, 32)[:200], "txt": "a cat", "json": meta},
        {"__key__": "bad_notxt", "jpg": good, "json": meta},
        {"__key__": "bad_empty", "jpg": good, "txt": "  ", "json": meta},
        {"__key__": "bad_noimg", "txt": "a dog", "json": meta},
        {"__key__": "bad_big", "png": _png_header_only_large(), "txt": "a big one", "json": meta},
        {"__key__": "dupkey", "jpg": good, "txt": "first", "json": meta},
        {"__key__": "okay_1", "jpg": good, "txt": "fine", "json": meta},
        {"__key__": "dupkey", "jpg": good, "txt": "again", "json": meta},
        {"__key__": "okay_2", "jpg": good, "txt": "fine too", "json": meta},
    ])
    # a truncated tar: 10 samples written, cut in the middle; the manifest still says 10
    full = os.path.join(d, "train-000003.tar")
    write_test_shards(d + "/tmp", 1, 10, key_offset=1000, manifest=False)
    data = open(os.path.join(d, "tmp", "train-000000.tar"), "rb").read()
    with open(full, "wb") as f:
        f.write(data[: len(data) // 2 + 100])
    import json

    m = json.load(open(os.path.join(d, "manifest.json")))
    m["splits"]["train"]["shards"] += [{"file": "train-000002.tar", "num_samples": 10},
                                       {"file": "train-000003.tar", "num_samples": 10}]
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    return d


def test_bad_samples_skipped_counted_and_balanced(bad_dir, tok):
    cfg = cfg_for(os.path.join(bad_dir, "train-*.tar"), max_image_pixels=5000)
    loaders, results = all_ranks(cfg, tok)
    counts = [len(r) for r in results]
    assert counts[0] == counts[1] == loaders[0].batches_per_epoch == 40 // 8
    skipped = collections.Counter()
    for ld in loaders:
        skipped.update(ld.skipped)
    assert skipped["corrupt_image"] == 2  # unreadable header + truncated pixel data
    assert skipped["missing_caption"] == 1
    assert skipped["empty_caption"] == 1
    assert skipped["missing_image"] == 1
    assert skipped["image_too_large"] == 1
    assert skipped["duplicate_key"] == 1
    assert skipped["truncated_tar"] >= 1
    keys = [k for r in results for b in r for k in b["keys"]]
    assert not any(k.startswith("bad_") for k in keys)
    for r in results:
        for b in r:
            assert b["pixels"].shape[0] == 4 and len(b["captions"]) == 4


def test_bad_samples_eval_each_good_sample_once(bad_dir, tok):
    cfg = cfg_for(os.path.join(bad_dir, "train-*.tar"), max_image_pixels=5000)
    _, results = all_ranks(cfg, tok, train=False, sources=cfg.train_shards)
    keys = [k for r in results for b in r for k in b["keys"]]
    assert len(keys) == len(set(keys))
    good = {f"{n:09d}" for n in range(20)} | {"okay_1", "okay_2", "dupkey"}
    assert good <= set(keys)
    assert not any(k.startswith("bad_") for k in keys)
    assert set(keys) - good <= {f"{n:09d}" for n in range(1000, 1010)}  # readable part of the cut tar


# ----------------------------------------------------------------------------- determinism / resume

def _order(batches):
    return [tuple(b["keys"]) for b in batches]


def test_same_seed_same_batches_other_epoch_other_order(uneven, tok):
    cfg = cfg_for(os.path.join(uneven, "train-*.tar"))
    a = ShardLoader(cfg, tok, rank=1, world_size=2, seed=3)
    b = ShardLoader(cfg, tok, rank=1, world_size=2, seed=3)
    ea, eb = run_epoch(a), run_epoch(b)
    assert _order(ea) == _order(eb)
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(ea, eb))
    assert a.epoch == 1  # the cursor moved on
    e1 = run_epoch(a)
    assert _order(e1) != _order(ea)
    c = ShardLoader(cfg, tok, rank=1, world_size=2, seed=4)
    assert _order(run_epoch(c)) != _order(ea)


@pytest.mark.parametrize("use_raw_cursor", [True, False])
def test_resume_mid_epoch_yields_exactly_the_rest(bad_dir, tok, use_raw_cursor):
    cfg = cfg_for(os.path.join(bad_dir, "train-*.tar"), max_image_pixels=5000, global_batch_size=4)
    ref = ShardLoader(cfg, tok, rank=0, world_size=2, seed=5)
    ref.set_epoch(2)
    full = run_epoch(ref)
    assert len(full) >= 5
    first = ShardLoader(cfg, tok, rank=0, world_size=2, seed=5)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    del it
    assert state["epoch"] == 2 and state["batches"] == 3
    if not use_raw_cursor:
        state = {**state, "worker_raw": None}
    resumed = ShardLoader(cfg, tok, rank=0, world_size=2, seed=5)
    resumed.load_state_dict(state)
    rest = run_epoch(resumed)
    assert _order(head + rest) == _order(full)
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(head + rest, full))
    assert resumed.epoch == 3


@pytest.mark.parametrize("use_raw_cursor", [True, False])
def test_resume_keeps_skip_and_refill_counts(bad_dir, tok, use_raw_cursor):
    """Stopped mid-epoch and resumed from the (JSON) state, the loader reports exactly the
    skip / refill counts of an uninterrupted run: earlier epochs are kept, and the replayed part
    of the current epoch is not counted a second time."""
    import json

    cfg = cfg_for(os.path.join(bad_dir, "train-*.tar"), max_image_pixels=5000, global_batch_size=4)
    ref = ShardLoader(cfg, tok, rank=0, world_size=1, seed=5)
    run_epoch(ref)
    run_epoch(ref)
    first = ShardLoader(cfg, tok, rank=0, world_size=1, seed=5)
    run_epoch(first)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    del it
    if not use_raw_cursor:
        state = {**state, "worker_raw": None}
    resumed = ShardLoader(cfg, tok, rank=0, world_size=1, seed=5)
    resumed.load_state_dict(state)
    run_epoch(resumed)
    assert resumed.epoch == ref.epoch == 2
    want = ref.skipped
    assert want["corrupt_image"] == 4 and want["missing_caption"] == 2  # decode and raw-check skips
    assert resumed.skipped == want
    assert resumed.refilled == ref.refilled > 0


@pytest.mark.parametrize("train", [False, True])
def test_a_pass_read_in_two_parts_counts_every_skip(bad_dir, tok, train):
    """An eval pass (or a train epoch) over shards with a corrupt image, read in two parts in one
    process (the first iteration stopped, the loader iterated again), yields the rest and reports
    the skips of one uninterrupted read. The second part's workers replay the first part without
    counting it; its counts used to be overwritten (an eval loader then reported none of the
    corrupt images it had skipped)."""
    cfg = cfg_for(os.path.join(bad_dir, "train-*.tar"), max_image_pixels=5000, global_batch_size=4)
    kw = dict(rank=0, world_size=1, seed=5, train=train, sources=cfg.train_shards)
    ref = ShardLoader(cfg, tok, **kw)
    full = run_epoch(ref)
    assert ref.skipped["corrupt_image"] == 2 and ref.skipped["missing_caption"] == 1
    # eval: every stop, the last ones included (a worker whose stream ended, its last partial
    # batch consumed, must not count its tail again)
    counted_in_first_part = []
    for stop in range(1, len(full)) if not train else [len(full) // 2]:
        ld = ShardLoader(cfg, tok, **kw)
        it = iter(ld)
        head = [next(it) for _ in range(stop)]
        it.close()
        counted_in_first_part.append(bool(ld.skipped))
        rest = run_epoch(ld)
        assert _order(head + rest) == _order(full), stop
        assert ld.skipped == ref.skipped, stop
        assert ld.refilled == ref.refilled
        if not train:  # a finished eval pass iterated again yields nothing and counts nothing
            assert run_epoch(ld) == [] and ld.skipped == ref.skipped
    assert any(counted_in_first_part)


def test_a_resumed_epoch_read_in_two_parts_yields_exactly_the_rest(bad_dir, tok):
    """After load_state_dict, a first iteration that stops early and a second one continue from
    the cursor (the second used to restart at the checkpoint's raw cursor and repeat batches)."""
    cfg = cfg_for(os.path.join(bad_dir, "train-*.tar"), max_image_pixels=5000, global_batch_size=4)
    ref = ShardLoader(cfg, tok, rank=0, world_size=1, seed=5)
    full = run_epoch(ref)
    first = ShardLoader(cfg, tok, rank=0, world_size=1, seed=5)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    it.close()
    resumed = ShardLoader(cfg, tok, rank=0, world_size=1, seed=5)
    resumed.load_state_dict(state)
    it = iter(resumed)
    mid = [next(it) for _ in range(2)]
    it.close()
    rest = run_epoch(resumed)
    got = head + mid + rest
    assert _order(got) == _order(full)
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(got, full))
    assert resumed.skipped == ref.skipped and resumed.refilled == ref.refilled


def test_infinite_advances_epochs(uneven, tok):
    cfg = cfg_for(os.path.join(uneven, "train-*.tar"), num_workers=0)
    ld = ShardLoader(cfg, tok, rank=0, world_size=1, seed=0)
    n = ld.batches_per_epoch
    it = ld.infinite()
    got = [next(it) for _ in range(n + 2)]
    assert ld.epoch == 1 and ld.state_dict()["batches"] == 2
    assert len(got) == n + 2


# ----------------------------------------------------------------------------- mixing, eval, errors

def test_mixing_weights_roughly_respected(tmp_path, tok):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_test_shards(a, 4, 20)                   # keys 0..79
    write_test_shards(b, 4, 20, key_offset=1000)  # keys 1000..1079
    cfg = cfg_for([a, b], train_weights=[3.0, 1.0], global_batch_size=16, num_workers=1)
    ld = ShardLoader(cfg, tok, rank=0, world_size=1, seed=0)
    keys = [k for _ in range(2) for bt in run_epoch(ld) for k in bt["keys"]]
    share_a = sum(int(k) < 1000 for k in keys) / len(keys)
    assert 0.65 <= share_a <= 0.85, share_a


def test_eval_mode_every_sample_once_no_drop(uneven, tok):
    cfg = cfg_for(os.path.join(uneven, "train-*.tar"), global_batch_size=6)
    loaders, results = all_ranks(cfg, tok, train=False, sources=cfg.train_shards)
    keys = [k for r in results for b in r for k in b["keys"]]
    assert sorted(keys) == [f"{n:09d}" for n in range(40)]
    again = [[k for b in run_epoch(ShardLoader(cfg, tok, rank=r, world_size=2, seed=0, train=False,
                                                        sources=cfg.train_shards))
              for k in b["keys"]] for r in range(2)]
    assert [k for r in again for k in r] == keys  # no shuffle: same order


def test_batch_size_must_divide(uneven, tok):
    with pytest.raises(ValueError, match="data.global_batch_size"):
        ShardLoader(cfg_for(uneven, global_batch_size=9), tok, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="no shards match"):
        ShardLoader(cfg_for(uneven + "/none-*.tar"), tok, rank=0, world_size=1, seed=0)


# ----------------------------------------------------------------------------- transforms

def test_pixel_guard_rejects_before_decode():
    big = jpeg_bytes(120, 100)
    assert check_image_header(big, 12_000) == (120, 100)
    with pytest.raises(BadSample) as e:
        check_image_header(big, 11_999)
    assert e.value.reason == "image_too_large"
    with pytest.raises(BadSample) as e:
        decode_and_crop(big, 8, max_pixels=11_999)
    assert e.value.reason == "image_too_large"


def test_crops_deterministic_per_sample():
    data = jpeg_bytes(64, 48)
    x = decode_and_crop(data, 16, max_pixels=10**6, train=True, seed=7)
    assert torch.equal(x, decode_and_crop(data, 16, max_pixels=10**6, train=True, seed=7))
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    ev = decode_and_crop(data, 16, max_pixels=10**6, train=False)
    assert ev.shape == (3, 16, 16)


def test_normalize_equals_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    g = torch.Generator().manual_seed(0)
    px = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=g)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ours = normalize(px, mean, std)
    ref = torch.stack([tvf.normalize(p.float() / 255.0, mean, std) for p in px])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert normalize(px, mean, std, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    import tarfile

    from mmpretrain.data.shardio import TruncatedTar, iter_tar_members

    names = ["a.txt", "d" * 90 + "/sub/" + "k" * 60 + ".jpg", "caf\u00e9.json", "x" * 120 + ".txt"]
    if fmt == "ustar":
        names = names[:3]
        names[2] = "cafe.json"
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format={"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT,
                                         "ustar": tarfile.USTAR_FORMAT}[fmt]) as tf:
        for i, n in enumerate(names):
            data = bytes([i]) * (100 * i + 3)
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        got = list(iter_tar_members(f))
    assert [(n, len(d)) for n, d in got] == [(n, 100 * i + 3) for i, n in enumerate(names)]
    raw = path.read_bytes()
    with pytest.raises(TruncatedTar):
        list(iter_tar_members(io.BytesIO(raw[:1024 + 200])))


def test_loader_and_shards_build_convert_pixels_alike():
    """16-bit PNGs are scaled to 8 bit (not saturated), transparent pixels go over the same white
    in the loader as in `shards build`, and a GIF decodes (issue: 254.5 instead of 127.5; black
    in one path, white in the other; .gif reported as missing_image)."""
    import io

    import numpy as np
    from PIL import Image

    from mmpretrain.data import build, stream, transforms as T

    def png(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    sixteen = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # mid-grey in 16 bit
    rgba = Image.new("RGBA", (8, 8), (10, 200, 30, 0))  # fully transparent green
    gif = io.BytesIO()
    Image.new("P", (8, 8), 3).save(gif, format="GIF")
    for data in (png(sixteen), png(rgba), gif.getvalue()):
        a = np.asarray(T.load_image(T.open_image(data, 10**6), 10**6)[0])
        b = np.asarray(build._to_rgb(Image.open(io.BytesIO(data)))[0])
        assert a.shape == (8, 8, 3) and np.array_equal(a, b)
    assert np.asarray(T.load_image(T.open_image(png(sixteen), 10**6), 10**6)[0]).mean() == 128
    assert (np.asarray(T.load_image(T.open_image(png(rgba), 10**6), 10**6)[0]) == 255).all()
    key, image, caption, _ = stream.check_sample({"__key__": "k", "gif": gif.getvalue(), "txt": b"a cat"}, 10**6)
    assert image == gif.getvalue() and caption == "a cat"


def test_skip_warnings_name_the_shard_and_the_key(tmp_path, tok, caplog):
    import logging

    from mmpretrain.data import stream as stream_mod

    good = [{"__key__": f"ok{i:03d}", "jpg": jpeg_bytes(), "txt": caption_for(i)} for i in range(8)]
    bad = [{"__key__": "nocap", "jpg": jpeg_bytes()},
           {"__key__": "garbage", "jpg": b"definitely not an image", "txt": "a cat"}]
    shard = write_raw_shard(str(tmp_path / "s-000000.tar"), bad + good)  # read before the quota fills
    stream_mod._last_warning.clear()  # at most one warning per reason per 30 s: start afresh
    with caplog.at_level(logging.WARNING, logger=stream_mod.log.name):
        ld = ShardLoader(cfg_for(shard, num_workers=0, global_batch_size=4, shuffle_buffer=0), tok, rank=0,
                         world_size=1, seed=0)
        run_epoch(ld)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ld.skipped == {"missing_caption": 1, "corrupt_image": 1}
    assert f"{shard} nocap" in text and f"{shard} garbage" in text, text
    assert "BytesIO" not in text and "not an image format PIL knows" in text


@pytest.mark.parametrize("cut", ["in the next header", "in the caption of the third"])
def test_a_cut_tar_loses_only_the_cut_sample(tmp_path, cut):
    import tarfile

    from mmpretrain.data.shardio import iter_shard_samples

    full = write_raw_shard(str(tmp_path / "full.tar"),
                           [{"__key__": f"k{i}", "jpg": jpeg_bytes(), "txt": caption_for(i)} for i in range(4)])
    with tarfile.open(full) as tf:
        members = {m.name: m for m in tf}
    if cut == "in the next header":  # after k1.txt: k0 and k1 are whole
        at, whole = members["k2.jpg"].offset + 100, ["k0", "k1"]
    else:  # inside k2's caption data: k0 and k1 whole, k2 lost
        at, whole = members["k2.txt"].offset_data + 3, ["k0", "k1"]
    data = open(full, "rb").read()
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(data[:at])
    got = list(iter_shard_samples(str(cut_path)))
    good = [s["__key__"] for _, s in got if "__bad__" not in s]
    bad = [s["__bad__"] for _, s in got if "__bad__" in s]
    assert good == whole and bad == ["truncated_tar"]


def _sleep_ignoring_sigterm():
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as ignore_stop_signals makes every loader worker
    time.sleep(120)


def test_stop_workers_kills_a_worker_that_ignores_sigterm():
    """A loader worker slow to quit survives DataLoader's terminate() fallback (it ignores
    SIGTERM), and multiprocessing's exit handler would then join it forever: stop_workers
    SIGKILLs what is still alive after the shutdown."""
    import multiprocessing as mp
    import time

    from mmpretrain.data.loader import stop_workers

    ctx = mp.get_context("fork")
    w = ctx.Process(target=_sleep_ignoring_sigterm, daemon=True)
    w.start()
    time.sleep(0.5)
    w.terminate()
    w.join(timeout=1.0)
    assert w.is_alive()  # SIGTERM ignored: what DataLoader's own fallback does is not enough

    class _Iter:  # the two DataLoader-iterator attributes stop_workers uses
        shut_down = False
        _workers = [w]

        def _shutdown_workers(self):
            self.shut_down = True

    it = _Iter()
    t0 = time.monotonic()
    stop_workers(it)
    assert it.shut_down and not w.is_alive() and w.exitcode == -9
    assert time.monotonic() - t0 < 10
