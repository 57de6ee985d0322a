"""``mmpretrain shards build``: real image-caption sources -> ``<name>-NNNNNN.tar`` + manifest.

Stages:
  1. list the source (``sources.py``): images in a fixed order, each with its captions; samples
     that cannot be used (no caption, no image file) are counted by reason, nothing is decoded;
  2. assign samples to shards: shard ``i`` = samples ``[i*K, (i+1)*K)`` of that order, so a
     re-run makes the same shards and skips those the manifest already lists;
  3. decode / convert / downscale / re-encode each image in a process pool (:func:`process_image`),
     in order; bad images are skipped and counted, never fatal;
  4. write each shard as ``.tar.tmp``, rename it when complete, then record it in the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from mmpretrain.data import sources
from mmpretrain.data.shardwriter import (
    ShardsError,
    TarShard,
    new_manifest,
    progress_bar,
    read_manifest,
    remove_stale_shards,
    sample_fields,
    shard_name,
    write_manifest,
)
from mmpretrain.data.sources import MAX_SKIP_EXAMPLES, ImageRef

FORMATS = ("folder", "csv", "jsonl", "coco", "flickr30k", "webdataset")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold
_PASS_THROUGH_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class ImageOptions:
    """What :func:`process_image` does to every image (sent to the worker processes)."""

    max_side: int = 512  # 0: keep the original size
    jpeg_quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS  # checked from the header, before decoding
    keep_formats: tuple[str, ...] = ("JPEG",)  # formats whose original bytes may be kept


@dataclass
class ProcessedImage:
    data: bytes
    ext: str
    width: int
    height: int
    orig_width: int
    orig_height: int
    converted: str | None  # "cmyk", "16bit", "palette", "alpha", "grayscale", ... or None


@dataclass
class Skipped:
    reason: str
    detail: str


# ------------------------------------------------------------------------------------- images
def _read_bytes(ref: ImageRef) -> bytes:
    with open(ref.path, "rb") as f:
        if ref.offset < 0:
            return f.read()
        f.seek(ref.offset)
        return f.read(ref.size)


def _to_rgb(image):
    """(RGB image, name of the conversion or None): the loader's own conversion (imported here:
    ``mmpretrain.data.transforms`` imports torch, which ``shards build --help`` does not need)."""
    if image.mode == "RGB":  # what to_rgb returns for it, without importing torch in every worker
        return image, None
    from mmpretrain.data.transforms import to_rgb

    return to_rgb(image)


def process_image(job: tuple[ImageRef, ImageOptions]) -> ProcessedImage | Skipped:
    """Read, check, decode, convert to RGB, downscale and encode one image (worker process)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    ref, opts = job
    Image.MAX_IMAGE_PIXELS = None  # the pixel count is checked below, before decoding
    try:
        data = _read_bytes(ref)
    except OSError as err:
        return Skipped("missing_image", f"{ref.describe()}: {err.strerror or err}")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Skipped("not_an_image", f"{ref.describe()}: not a readable image")
    except Exception as err:  # noqa: BLE001 - any header parse failure of one file
        return Skipped("decode_error", f"{ref.describe()}: {err}")
    orig_w, orig_h = image.size
    if orig_w * orig_h > opts.max_pixels:
        return Skipped("too_large", f"{ref.describe()}: {orig_w}x{orig_h} > {opts.max_pixels} pixels")
    fmt = image.format
    target = None
    if opts.max_side and max(orig_w, orig_h) > opts.max_side:
        scale = opts.max_side / max(orig_w, orig_h)
        target = (max(1, round(orig_w * scale)), max(1, round(orig_h * scale)))
    try:
        if target is not None and fmt == "JPEG" and image.mode in ("RGB", "L"):
            image.draft(image.mode, target)  # JPEG DCT scaling: decode at >= target size, faster
        image.load()
        orientation = image.getexif().get(0x0112, 1) if fmt in ("JPEG", "WEBP", "TIFF", "PNG") else 1
        if orientation not in (1, None):
            image = ImageOps.exif_transpose(image)
            if target is not None:
                target = target if (image.size[0] >= image.size[1]) == (target[0] >= target[1]) else target[::-1]
        image, converted = _to_rgb(image)
        if target is not None and image.size != target:
            image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt data of one file
        return Skipped("decode_error", f"{ref.describe()}: {err}")
    if target is None and converted is None and orientation in (1, None) and fmt in opts.keep_formats:
        return ProcessedImage(data, _PASS_THROUGH_EXT[fmt], orig_w, orig_h, orig_w, orig_h, None)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=opts.jpeg_quality)
    w, h = image.size
    return ProcessedImage(buf.getvalue(), "jpg", w, h, orig_w, orig_h, converted)


# -------------------------------------------------------------------------------------- build
@dataclass
class BuildOptions:
    format: str
    input: str
    out: str
    name: str = "data"
    images: str | None = None
    samples_per_shard: int = 1000
    max_side: int = 512
    jpeg_quality: int = 90
    workers: int | None = None  # None: min(8, CPU count); 0 or 1: in this process
    split: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False

    def command(self) -> str:
        parts = ["mmpretrain shards build", f"--format {self.format}", f"--input {self.input}", f"--out {self.out}",
                 f"--name {self.name}", f"--samples-per-shard {self.samples_per_shard}",
                 f"--max-side {self.max_side}", f"--jpeg-quality {self.jpeg_quality}"]
        if self.images:
            parts.append(f"--images {self.images}")
        if self.split:
            parts.append(f"--split {self.split}")
        return " ".join(parts)


def list_source(opts: BuildOptions) -> sources.Listing:
    if opts.format == "folder":
        return sources.list_folder(opts.input)
    if opts.format == "csv":
        return sources.list_csv(opts.input, opts.images)
    if opts.format == "jsonl":
        return sources.list_jsonl(opts.input, opts.images)
    if opts.format == "coco":
        return sources.list_coco(opts.input, opts.images)
    if opts.format == "flickr30k":
        return sources.list_karpathy(opts.input, opts.images, opts.split)
    if opts.format == "webdataset":
        return sources.list_webdataset(opts.input)
    raise ShardsError(f"--format: unknown format {opts.format!r} (choose from {', '.join(FORMATS)})")


def _validate(opts: BuildOptions) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", opts.name):
        raise ShardsError(f"--name: {opts.name!r} may only hold letters, digits, '_' and '-'")
    if opts.samples_per_shard < 1:
        raise ShardsError(f"--samples-per-shard: must be >= 1 (got {opts.samples_per_shard})")
    if opts.max_side < 0:
        raise ShardsError(f"--max-side: must be >= 0 (got {opts.max_side})")
    if not 1 <= opts.jpeg_quality <= 100:
        raise ShardsError(f"--jpeg-quality: must be in 1..100 (got {opts.jpeg_quality})")
    if opts.split and opts.format != "flickr30k":
        raise ShardsError("--split: only used with --format flickr30k")


def _fingerprint(opts: BuildOptions, listing: sources.Listing, image_opts: ImageOptions) -> str:
    """Hash of everything that decides the shards' contents: a resume must see the same value.
    File names enter relative to the input, so resuming from another working directory works."""
    h = hashlib.sha256()
    h.update(json.dumps([opts.format, opts.name, opts.samples_per_shard, asdict(image_opts)]).encode())
    for img in listing.images:
        h.update(json.dumps([img.meta.get("file"), str(img.image_id), img.captions]).encode())
    return h.hexdigest()[:16]


def _add_counts(total: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def build(opts: BuildOptions) -> dict:
    """Build (or finish building) ``<out>/<name>-NNNNNN.tar``; returns the manifest."""
    _validate(opts)
    listing = list_source(opts)
    image_opts = ImageOptions(
        max_side=opts.max_side,
        jpeg_quality=opts.jpeg_quality,
        max_pixels=opts.max_pixels,
        keep_formats=("JPEG", "PNG", "WEBP") if opts.format == "webdataset" else ("JPEG",),
    )
    # every sample is (image index, caption index), in listing order
    samples = [(i, c) for i, img in enumerate(listing.images) for c in range(len(img.captions))]
    if not samples:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(listing.skipped.items())) or "none"
        raise ShardsError(f"{opts.input}: no usable image-caption pairs (skipped: {counts})")
    k = opts.samples_per_shard
    num_shards = math.ceil(len(samples) / k)
    fingerprint = _fingerprint(opts, listing, image_opts)

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out) or new_manifest(opts.command())
    entry = manifest["splits"].get(opts.name)
    if entry is not None and entry.get("build", {}).get("fingerprint") != fingerprint and not opts.overwrite:
        raise ShardsError(
            f"{out / 'manifest.json'}: split '{opts.name}' was made from other input or settings; "
            "pass --overwrite to rebuild it, or use another --out/--name"
        )
    if entry is None or entry.get("build", {}).get("fingerprint") != fingerprint:
        entry = {"shards": [], "num_samples": 0}
    # resume: keep the shards the manifest lists whose tar is still there
    done = {s["file"]: s for s in entry["shards"] if (out / s["file"]).is_file()}
    entry.update(
        shards=[],
        skipped=dict(sorted(listing.skipped.items())),
        skipped_files=list(listing.skipped_files),
        converted={},
        complete=False,
        build={**json.loads(json.dumps(asdict(opts))), "num_source_samples": len(samples),
               "num_shards": num_shards, "fingerprint": fingerprint},
    )
    entry["build"].pop("overwrite", None)
    entry["build"].pop("workers", None)
    for s in done.values():
        _record_shard(entry, s)
    manifest["splits"][opts.name] = entry
    manifest["created_by"] = opts.command()
    write_manifest(out, manifest)

    pending = [i for i in range(num_shards) if shard_name(opts.name, i) not in done]
    # jobs in shard order; an image whose captions straddle two shards is decoded once per shard
    jobs: list[tuple[int, int, list[int]]] = []  # (shard, image index, caption indices)
    for shard in pending:
        for i, c in samples[shard * k:(shard + 1) * k]:
            if jobs and jobs[-1][0] == shard and jobs[-1][1] == i:
                jobs[-1][2].append(c)
            else:
                jobs.append((shard, i, [c]))
    offsets = [0]  # offsets[i]: global index of image i's first caption
    for img in listing.images:
        offsets.append(offsets[-1] + len(img.captions))

    workers = min(8, os.cpu_count() or 1) if opts.workers is None else opts.workers
    work = [(listing.images[i].ref, image_opts) for _, i, _ in jobs]
    # a process pool that breaks (a worker killed) raises instead of hanging; the build resumes
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.map(process_image, work, chunksize=8) if pool else (process_image(w) for w in work)
        _write_shards(out, opts, manifest, entry, listing, jobs, results, offsets)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    entry["shards"].sort(key=lambda s: s["file"])
    entry["complete"] = True
    remove_stale_shards(out, opts.name, {s["file"] for s in entry["shards"]})
    write_manifest(out, manifest)
    return manifest


def _record_shard(entry: dict, shard: dict) -> None:
    entry["shards"].append(shard)
    entry["skipped"] = _add_counts(entry["skipped"], shard.get("skipped", {}))
    room = MAX_SKIP_EXAMPLES - len(entry.setdefault("skipped_files", []))
    entry["skipped_files"] += shard.get("skipped_files", [])[:max(room, 0)]
    entry["converted"] = _add_counts(entry["converted"], shard.get("converted", {}))


def _write_shards(out, opts, manifest, entry, listing, jobs, results, offsets) -> None:
    """Consume the processed images in job order; a shard is committed as soon as its last
    image is written (before the next image is even waited for)."""
    current: TarShard | None = None
    skipped: dict[str, int] = {}
    skipped_files: list[str] = []
    converted: dict[str, int] = {}
    try:
        with progress_bar(sum(len(caps) for _, _, caps in jobs), f"build {opts.name}") as bar:
            for n, ((shard, i, caps), result) in enumerate(zip(jobs, results)):
                if current is None:
                    current, skipped, converted = TarShard(out / shard_name(opts.name, shard)), {}, {}
                    skipped_files = []
                if isinstance(result, Skipped):
                    skipped[result.reason] = skipped.get(result.reason, 0) + len(caps)
                    if len(skipped_files) < MAX_SKIP_EXAMPLES:
                        skipped_files.append(f"{result.reason}: {result.detail}")
                else:
                    if result.converted:
                        converted[result.converted] = converted.get(result.converted, 0) + 1
                    _add_samples(current, opts, listing.images[i], caps, offsets[i], result)
                bar.update(len(caps))
                if n + 1 == len(jobs) or jobs[n + 1][0] != shard:
                    _finish(current, entry, out, manifest, skipped, converted, skipped_files)
                    current = None
    finally:
        if current is not None:  # interrupted: no half shard survives under its final name
            current.abort()


def _add_samples(shard: TarShard, opts, img, caps: list[int], first_index: int, result: ProcessedImage) -> None:
    meta = {
        **img.meta,
        "image_id": img.image_id,
        "source": img.meta.get("source") or opts.format,
        "width": result.width,
        "height": result.height,
        "orig_width": result.orig_width,
        "orig_height": result.orig_height,
    }
    for c in caps:
        key = f"{opts.name}_{first_index + c:09d}"  # global sample index: unique, stable on resume
        shard.add(key, sample_fields(result.data, result.ext, img.captions[c], meta))


def _finish(shard: TarShard, entry, out, manifest, skipped, converted, skipped_files=()) -> None:
    shard.commit()
    record = {"file": shard.path.name, "num_samples": shard.num_samples}
    if skipped:
        record["skipped"] = dict(sorted(skipped.items()))
        record["skipped_files"] = list(skipped_files)
    if converted:
        record["converted"] = dict(sorted(converted.items()))
    _record_shard(entry, record)
    write_manifest(out, manifest)
