"""Tiny WebDataset shards for tests, written with plain ``webdataset.TarWriter``.

Layout as img2dataset / ARCHITECTURE.md: per sample ``__key__``, ``jpg``, ``txt``, ``json``
(``image_id``, ``source``, ``width``, ``height``). Optionally a ``manifest.json``.
"""

from __future__ import annotations

import io
import json
import os
import random

from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]


def jpeg_bytes(width: int = 16, height: int = 16, colour=(200, 30, 30), quality: int = 90,
               fmt: str = "JPEG") -> bytes:
    img = Image.new("RGB", (width, height), colour)
    # a small gradient so crops differ
    px = img.load()
    for x in range(width):
        px[x, 0] = (x * 255 // max(1, width - 1), 0, 0)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def caption_for(i: int) -> str:
    return f"a {COLOURS[i % len(COLOURS)]} {SHAPES[(i // len(COLOURS)) % len(SHAPES)]} number {i}"


def write_test_shards(out_dir: str, num_shards: int, samples_per_shard: int | list[int], *,
                      prefix: str = "train", image_size: int = 16, manifest: bool = True,
                      captions_per_image: int = 1, seed: int = 0, key_offset: int = 0) -> list[str]:
    """Write ``num_shards`` tars ``{prefix}-{i:06d}.tar`` into ``out_dir``; returns their paths.

    Sample ``n`` (global order) has key ``{n:09d}``, caption ``caption_for(n)`` and
    ``image_id = n // captions_per_image``. ``samples_per_shard`` may be a list (one per shard).
    """
    import webdataset as wds

    os.makedirs(out_dir, exist_ok=True)
    counts = samples_per_shard if isinstance(samples_per_shard, list) else [samples_per_shard] * num_shards
    rng = random.Random(seed)
    paths, entries = [], []
    n = key_offset
    for s in range(num_shards):
        name = f"{prefix}-{s:06d}.tar"
        path = os.path.join(out_dir, name)
        with wds.TarWriter(path) as sink:
            for _ in range(counts[s]):
                colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
                sink.write({
                    "__key__": f"{n:09d}",
                    "jpg": jpeg_bytes(image_size, image_size, colour),
                    "txt": caption_for(n),
                    "json": {"image_id": f"img{n // captions_per_image}", "source": "test",
                             "width": image_size, "height": image_size},
                })
                n += 1
        paths.append(path)
        entries.append({"file": name, "num_samples": counts[s]})
    if manifest:
        mpath = os.path.join(out_dir, "manifest.json")
        data = {"format": "mmpretrain-shards/1", "splits": {}, "skipped": {}, "created_by": "tests"}
        if os.path.exists(mpath):
            with open(mpath) as f:
                data = json.load(f)
        data["splits"][prefix] = {"shards": entries, "num_samples": sum(counts)}
        with open(mpath, "w") as f:
            json.dump(data, f)
    return paths


def write_raw_shard(path: str, samples: list[dict]) -> str:
    """A tar with exactly these samples (bytes/str/dict values; ``__key__`` required), no
    validation — for corrupt-input tests."""
    import webdataset as wds

    with wds.TarWriter(path) as sink:
        for s in samples:
            sink.write(s)
    return path
