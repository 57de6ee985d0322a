"""`mmpretrain bench loader --shards PATTERN [--workers N] [--batches N]`.

Two numbers from the same shards, in one run:

* **loader**: samples/s of the full ``ShardLoader`` (tar reading, raw checks, shuffle buffer,
  decode + random-resized-crop, tokenize, collate inside ``--workers`` DataLoader workers, batches
  shipped to the main process), divided by the number of workers -> samples/s per worker.
  Timed from the first batch on (worker start-up excluded; reported separately).
* **raw**: decode + crop/resize (the same ``decode_and_crop_hwc`` the workers run, so the same
  JPEG reduce-on-load path) of exactly the samples of the timed batches, with the crop boxes the
  loader gave them, in a plain loop in this process, image bytes already in memory. Its first
  batch-size images are a warm-up and are not timed, like the loader's first batch.

The ratio loader-per-worker / raw is the loader's efficiency (target >= 0.8). Per-worker rates
only mean something when the machine has a free core per worker, so the JSON line also holds
the load average and CPU seconds per sample (Linux: the workers' CPU time from ``/proc`` and
``getrusage``), whose ratio ``cpu_ratio`` = raw CPU / worker CPU per sample is less sensitive to
other processes on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from mmpretrain.data.config import DataConfig


def _children_cpu_s() -> float | None:
    """CPU seconds of this process's children: terminated (waited-for) ones from ``getrusage``
    plus the live ones from ``/proc`` (Linux); None where ``/proc`` is missing."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = ru.ru_utime + ru.ru_stime
    if not os.path.isdir("/proc"):
        return None
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # fields[1] = ppid; [11], [12] = utime, stime in ticks
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _read_images(urls: list[str], keys: set[str]) -> dict[str, bytes]:
    from mmpretrain.data.shardio import IMAGE_EXTS, iter_shard_samples

    images: dict[str, bytes] = {}
    for url in urls:
        for _, s in iter_shard_samples(url):
            if s.get("__key__") in keys:
                img = next((s[e] for e in IMAGE_EXTS if e in s), None)
                if img is not None:
                    images[s["__key__"]] = img
    return images


def raw_decode_rate(items: list[tuple[bytes, int]], image_size: int, max_pixels: int, *, crop: str = "random_resized",
                    warmup: int = 32) -> dict:
    """Decode + crop + resize of ``(image bytes, crop seed)`` in a plain loop; the first
    ``warmup`` items are not timed."""
    from mmpretrain.data.transforms import BadSample, decode_and_crop_hwc

    def run(part):
        done = 0
        for img, seed in part:
            try:
                decode_and_crop_hwc(img, image_size, max_pixels=max_pixels, train=True, crop=crop, seed=seed)
                done += 1
            except BadSample:
                pass
        return done

    run(items[:warmup])
    timed = items[warmup:] or items
    c0, t0 = time.process_time(), time.perf_counter()
    done = run(timed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"samples_per_s": done / max(wall, 1e-9), "samples": done,
            "cpu_s_per_sample": cpu / max(done, 1)}


def loader_rate(shards: list[str], tok, *, workers: int, batches: int, batch_size: int, image_size: int,
                max_length: int, seed: int = 0) -> dict:
    from mmpretrain.data.loader import ShardLoader

    cfg = DataConfig(train_shards=shards, global_batch_size=batch_size, num_workers=workers,
                     image_size=image_size, max_length=max_length)
    loader = ShardLoader(cfg, tok, rank=0, world_size=1, seed=seed)
    t_start = time.perf_counter()
    it = loader.infinite()
    next(it)
    t_first = time.perf_counter()
    main0, kids0 = time.process_time(), _children_cpu_s()
    samples: list[tuple[int, str]] = []  # (epoch, key) of every timed sample
    for _ in range(batches):
        b = next(it)
        samples += [(loader.epoch, k) for k in b["keys"]]  # the cursor moves on after an epoch's last batch
    t_end = time.perf_counter()
    main1, kids1 = time.process_time(), _children_cpu_s()
    n = batches * loader.batch
    rate = n / (t_end - t_first)
    out = {"startup_s": round(t_first - t_start, 3), "samples_per_s": rate,
           "samples_per_s_per_worker": rate / max(1, workers), "batches": batches,
           "epochs_touched": len({e for e, _ in samples}), "samples": samples, "seed": seed,
           "main_cpu_s_per_sample": (main1 - main0) / n, "worker_cpu_s_per_sample": None,
           "remote_retries": loader.remote_retries}
    if workers > 0 and kids0 is not None and kids1 is not None:
        out["worker_cpu_s_per_sample"] = (kids1 - kids0) / n
    elif workers == 0:
        out["worker_cpu_s_per_sample"] = out["main_cpu_s_per_sample"]
    return out


def main(argv: list[str] | None = None) -> int:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="mmpretrain bench loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", metavar="PATTERN",
                   help="shard pattern(s) (braces/globs), directory or URL (http(s)://, s3://, pipe:); required")
    p.add_argument("--workers", type=int, default=d.num_workers, metavar="N",
                   help=f"DataLoader worker processes of the full loader; the raw loop always runs in this process "
                        f"(default: {d.num_workers}, data.num_workers)")
    p.add_argument("--batches", type=int, default=50, metavar="N",
                   help="batches timed after the first one (default: 50)")
    p.add_argument("--batch-size", type=int, default=d.global_batch_size, metavar="B",
                   help=f"samples per batch, one process (default: {d.global_batch_size}, data.global_batch_size)")
    p.add_argument("--image-size", type=int, default=d.image_size, metavar="PX",
                   help=f"crop/resize side of both loops (default: {d.image_size}, data.image_size)")
    p.add_argument("--max-length", type=int, default=d.max_length, metavar="N",
                   help=f"tokenizer truncation length (default: {d.max_length}, data.max_length)")
    p.add_argument("--tokenizer", default="auto", metavar="SPEC",
                   help="'auto' (the tokenizer/ folder beside the shards; trained in memory from the captions if "
                        "missing), a tokenizer directory or a hub name (default: auto)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    from mmpretrain.data.shardio import expand_sources, stable_hash
    from mmpretrain.data.tokenizer import load_tokenizer

    urls = expand_sources(args.shards)
    if not urls:
        print(f"mmpretrain bench loader: no shards match {args.shards}", file=sys.stderr)
        return 2
    tok = load_tokenizer(args.tokenizer, urls, d.vocab_size, save=False)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    full = loader_rate(args.shards, tok, workers=args.workers, batches=args.batches,
                       batch_size=args.batch_size, image_size=args.image_size, max_length=args.max_length)
    # the raw loop: the very samples the loader delivered, with the crop seeds the workers used
    # (stable_hash((seed, epoch, key, pass)); no sample is refilled in a clean benchmark shard set)
    images = _read_images(urls, {k for _, k in full["samples"]})
    items = [(images[k], stable_hash((full["seed"], e, k, 0))) for e, k in full["samples"] if k in images]
    raw = raw_decode_rate(items, args.image_size, d.max_image_pixels, crop=d.train_crop,
                          warmup=min(args.batch_size, len(items) // 2))
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ratio = full["samples_per_s_per_worker"] / raw["samples_per_s"] if raw["samples_per_s"] > 0 else 0.0
    wcpu = full["worker_cpu_s_per_sample"]
    cpu_ratio = raw["cpu_s_per_sample"] / wcpu if wcpu else None
    print(f"loader: {full['samples_per_s']:.1f} samples/s with {args.workers} workers = "
          f"{full['samples_per_s_per_worker']:.1f} samples/s per worker (start-up {full['startup_s']} s)")
    print(f"raw decode+resize, one process: {raw['samples_per_s']:.1f} samples/s over {raw['samples']} images "
          "(the loader's samples and crops)")
    print(f"ratio per worker / raw: {ratio:.2f} (target >= 0.8)")
    if wcpu:
        print(f"CPU per sample: workers {wcpu * 1e6:.0f} us, main process {full['main_cpu_s_per_sample'] * 1e6:.0f} us, "
              f"raw {raw['cpu_s_per_sample'] * 1e6:.0f} us; raw / workers = {cpu_ratio:.2f}")
    print(f"load average (1 min) before/after: {load_before} / {load_after} on {os.cpu_count()} CPUs")
    print(json.dumps({"workers": args.workers, "image_size": args.image_size, "batch_size": args.batch_size,
                      "batches": args.batches, "epochs_touched": full["epochs_touched"],
                      "loader_samples_per_s": round(full["samples_per_s"], 1),
                      "loader_samples_per_s_per_worker": round(full["samples_per_s_per_worker"], 1),
                      "raw_samples_per_s": round(raw["samples_per_s"], 1), "raw_samples": raw["samples"],
                      "ratio": round(ratio, 3),
                      "worker_cpu_us_per_sample": round(wcpu * 1e6, 1) if wcpu else None,
                      "main_cpu_us_per_sample": round(full["main_cpu_s_per_sample"] * 1e6, 1),
                      "raw_cpu_us_per_sample": round(raw["cpu_s_per_sample"] * 1e6, 1),
                      "cpu_ratio": round(cpu_ratio, 3) if cpu_ratio else None,
                      "startup_s": full["startup_s"], "remote_retries": full["remote_retries"],
                      "loadavg_1m": [load_before, load_after],
                      "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
