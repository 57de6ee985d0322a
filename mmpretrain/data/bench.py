"""`mmpretrain bench loader --shards PATTERN [--workers N] [--batches N]`.

Two numbers from the same shards, in one run:

* **loader**: samples/s of the full ``ShardLoader`` (tar reading, raw checks, shuffle buffer,
  decode + random-resized-crop, tokenize, collate inside ``--workers`` DataLoader workers, batches
  shipped to the main process), divided by the number of workers -> samples/s per worker.
  Timed from the first batch on (worker start-up excluded; reported separately).
* **raw**: decode + crop/resize (the same ``decode_and_crop_hwc`` the workers run) of the same images in a plain
  loop in this process, image bytes already in memory.

The ratio loader-per-worker / raw is the loader's efficiency (target >= 0.8). Per-worker rates
only mean something when the machine has a free core per worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mmpretrain.data.config import DataConfig


def raw_decode_rate(urls: list[str], n: int, image_size: int, max_pixels: int) -> tuple[float, int]:
    from mmpretrain.data.loader import IMAGE_EXTS, iter_shard_samples
    from mmpretrain.data.transforms import BadSample, decode_and_crop_hwc

    images: list[bytes] = []
    for url in urls:
        for _, s in iter_shard_samples(url):
            img = next((s[e] for e in IMAGE_EXTS if e in s), None)
            if img is not None:
                images.append(img)
            if len(images) >= n:
                break
        if len(images) >= n:
            break
    t0 = time.perf_counter()
    done = 0
    for i, img in enumerate(images):
        try:
            decode_and_crop_hwc(img, image_size, max_pixels=max_pixels, train=True, seed=i)
            done += 1
        except BadSample:
            pass
    return done / max(time.perf_counter() - t0, 1e-9), done


def loader_rate(shards: list[str], tok, *, workers: int, batches: int, batch_size: int, image_size: int,
                max_length: int) -> dict:
    from mmpretrain.data.loader import ShardLoader

    cfg = DataConfig(train_shards=shards, batch_size=batch_size, num_workers=workers, image_size=image_size,
                     max_length=max_length)
    loader = ShardLoader(cfg, tok, rank=0, world_size=1, seed=0)
    t_start = time.perf_counter()
    it = loader.infinite()
    next(it)
    t_first = time.perf_counter()
    for _ in range(batches):
        next(it)
    t_end = time.perf_counter()
    rate = batches * loader.batch / (t_end - t_first)
    return {"startup_s": round(t_first - t_start, 3), "samples_per_s": rate,
            "samples_per_s_per_worker": rate / max(1, workers), "batches": batches,
            "epochs_touched": loader.epoch + 1}


def main(argv: list[str] | None = None) -> int:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="mmpretrain bench loader", description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, nargs="+", help="shard pattern(s), directory or URL")
    p.add_argument("--workers", type=int, default=d.num_workers)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--tokenizer", default="auto")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    from mmpretrain.data.loader import expand_sources
    from mmpretrain.data.tokenizer import load_tokenizer

    urls = expand_sources(args.shards)
    if not urls:
        print(f"mmpretrain bench loader: no shards match {args.shards}", file=sys.stderr)
        return 2
    tok = load_tokenizer(args.tokenizer, urls, d.vocab_size, save=False)
    full = loader_rate(args.shards, tok, workers=args.workers, batches=args.batches,
                       batch_size=args.batch_size, image_size=args.image_size, max_length=args.max_length)
    raw, n_raw = raw_decode_rate(urls, min(2000, args.batches * args.batch_size), args.image_size,
                                 d.max_image_pixels)
    ratio = full["samples_per_s_per_worker"] / raw if raw > 0 else 0.0
    print(f"loader: {full['samples_per_s']:.1f} samples/s with {args.workers} workers = "
          f"{full['samples_per_s_per_worker']:.1f} samples/s per worker (start-up {full['startup_s']} s)")
    print(f"raw decode+resize, one process: {raw:.1f} samples/s over {n_raw} images")
    print(f"ratio per worker / raw: {ratio:.2f} (target >= 0.8)")
    print(json.dumps({"workers": args.workers, "image_size": args.image_size, "batch_size": args.batch_size,
                      "loader_samples_per_s": round(full["samples_per_s"], 1),
                      "loader_samples_per_s_per_worker": round(full["samples_per_s_per_worker"], 1),
                      "raw_samples_per_s": round(raw, 1), "ratio": round(ratio, 3),
                      "startup_s": full["startup_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
