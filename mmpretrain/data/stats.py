"""`mmpretrain shards stats DIR|PATTERN`: what the loader sees in a set of shards.

Reads every sample through the loader's own path (``ShardLoader`` in eval mode: same tar
reading, raw checks, pixel guard, decode and center crop) and reports samples read, skipped
samples by reason, the per-channel mean/std of the 0-1 images (to replace ImageNet's
``data.mean``/``data.std``), caption lengths in tokens (mean, p50, p95, max, untruncated,
[CLS]/[SEP] included) and the share of captions ``--max-length`` would truncate. The LAST line
printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from mmpretrain.data.config import DataConfig


def _percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return 0.0
    pos = (len(sorted_vals) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo))


def compute_stats(shards: str | list[str], *, tokenizer, max_length: int = 32, image_size: int = 64,
                  num_workers: int = 0, batch_size: int = 64, max_image_pixels: int | None = None) -> dict:
    from mmpretrain.data.loader import ShardLoader

    defaults = DataConfig()
    cfg = DataConfig(batch_size=batch_size, num_workers=num_workers, image_size=image_size,
                     max_length=max_length,
                     max_image_pixels=max_image_pixels or defaults.max_image_pixels)
    loader = ShardLoader(cfg, tokenizer, rank=0, world_size=1, seed=0, train=False, sources=shards)
    n = 0
    s1 = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    npix = 0
    lengths: list[int] = []
    for batch in loader:
        x = batch["pixels"].to(torch.float64) / 255.0
        s1 += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
        npix += x.shape[0] * x.shape[2] * x.shape[3]
        n += x.shape[0]
        enc = tokenizer(batch["captions"], truncation=False, padding=False, return_attention_mask=False,
                        return_token_type_ids=False)
        lengths += [len(ids) for ids in enc["input_ids"]]
    mean = (s1 / max(npix, 1)).tolist()
    var = (s2 / max(npix, 1) - (s1 / max(npix, 1)) ** 2).clamp_min(0)
    lengths.sort()
    return {
        "shards": len([u for src in loader.source_urls for u in src]),
        "unreadable_shards": dict(loader.unreadable_shards),
        "samples": n,
        "skipped": loader.skipped,
        "skipped_total": sum(loader.skipped.values()),
        "pixel_mean": [round(v, 5) for v in mean],
        "pixel_std": [round(v, 5) for v in var.sqrt().tolist()],
        "image_size": image_size,
        "caption_tokens": {
            "mean": round(sum(lengths) / len(lengths), 3) if lengths else 0.0,
            "p50": _percentile(lengths, 0.5),
            "p95": _percentile(lengths, 0.95),
            "max": lengths[-1] if lengths else 0,
        },
        "max_length": max_length,
        "truncated_share": round(sum(v > max_length for v in lengths) / len(lengths), 5) if lengths else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmpretrain shards stats", description=__doc__.split("\n")[0])
    p.add_argument("shards", help="shard directory, pattern (braces/globs) or URL")
    p.add_argument("--max-length", type=int, default=DataConfig().max_length)
    p.add_argument("--tokenizer", default="auto",
                   help="'auto' (tokenizer/ beside the shards; trained in memory if missing), a directory or hub name")
    p.add_argument("--vocab-size", type=int, default=DataConfig().vocab_size)
    p.add_argument("--image-size", type=int, default=DataConfig().image_size,
                   help="images are center-cropped to this size before the pixel statistics")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    from mmpretrain.data.shardio import expand_sources
    from mmpretrain.data.tokenizer import load_tokenizer

    try:
        if not expand_sources(args.shards):  # before the tokenizer, which would complain instead
            raise ValueError(f"no shards match {args.shards}")
        tok = load_tokenizer(args.tokenizer, [args.shards], args.vocab_size, save=False)
        stats = compute_stats(args.shards, tokenizer=tok, max_length=args.max_length,
                              image_size=args.image_size, num_workers=args.workers)
    except ValueError as e:
        print(f"mmpretrain shards stats: {e}", file=sys.stderr)
        return 2
    ct = stats["caption_tokens"]
    print(f"shards: {stats['shards']}  samples read: {stats['samples']}  skipped: {stats['skipped_total']}")
    for url, why in stats["unreadable_shards"].items():
        print(f"unreadable shard (no sample read): {url}: {why}")
    for reason, count in sorted(stats["skipped"].items()):
        print(f"  skipped {reason}: {count}")
    print(f"pixel mean (0-1): {stats['pixel_mean']}  std: {stats['pixel_std']}")
    print(f"caption tokens: mean {ct['mean']} p50 {ct['p50']} p95 {ct['p95']} max {ct['max']}; "
          f"max_length={args.max_length} truncates {100 * stats['truncated_share']:.2f}%")
    print(json.dumps(stats, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
