"""`mmpretrain shards stats DIR|PATTERN`: what the loader sees in a set of shards, split by split.

Reads every sample through the loader's own path (``ShardLoader`` in eval mode: same tar
reading, raw checks, pixel guard, decode and center crop) and reports samples read, skipped
samples by reason, the per-channel mean/std of the 0-1 images (to replace ImageNet's
``data.mean``/``data.std``), caption lengths in tokens (mean, p50, p95, max, untruncated,
[CLS]/[SEP] included) and the share of captions ``--max-length`` would truncate.

Each split is reported on its own (the shard name before ``-NNNNNN.tar``: ``train``, ``val``;
for a directory also its subdirectories that hold a ``manifest.json`` and shards, e.g.
``classify/`` of ``mmpretrain shards synthetic``), then the total over all of them. The LAST
line printed is a JSON summary: the totals at the top level and ``"splits": {name: stats}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

from mmpretrain.data.config import DataConfig

_SPLIT_RE = re.compile(r"^(.*?)[-_]\d+\.(?:tar|tar\.gz|tgz)$")


def split_of(url: str) -> str:
    """The split a shard belongs to: its file name before ``-NNNNNN.tar`` (``train-000003.tar``
    -> ``train``); a name without a shard number is its own split."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    m = _SPLIT_RE.match(name)
    return m.group(1) if m and m.group(1) else name


def group_splits(spec: str) -> dict[str, list[str]]:
    """Shard URLs of ``spec`` by split, in first-seen order. A local directory also contributes
    each subdirectory holding a ``manifest.json`` (its splits named ``SUBDIR`` when it holds one
    split, else ``SUBDIR/split``)."""
    from mmpretrain.data.shardio import expand_sources

    groups: dict[str, list[str]] = {}
    for url in expand_sources(spec):
        groups.setdefault(split_of(url), []).append(url)
    path = spec[len("file://"):] if spec.startswith("file://") else spec
    if os.path.isdir(path):
        for sub in sorted(os.listdir(path)):
            d = os.path.join(path, sub)
            if not os.path.isfile(os.path.join(d, "manifest.json")):
                continue
            inner: dict[str, list[str]] = {}
            for url in expand_sources(d):
                inner.setdefault(split_of(url), []).append(url)
            for name, urls in inner.items():
                groups[sub if len(inner) == 1 else f"{sub}/{name}"] = urls
    return groups


def _percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return 0.0
    pos = (len(sorted_vals) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo))


def _accumulate(shards, *, tokenizer, max_length, image_size, num_workers, batch_size, max_image_pixels) -> dict:
    """Raw sums over every sample of ``shards`` (combined across splits by :func:`_summarise`)."""
    import torch

    from mmpretrain.data.loader import ShardLoader

    defaults = DataConfig()
    cfg = DataConfig(global_batch_size=batch_size, num_workers=num_workers, image_size=image_size,
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
    return {"shards": len([u for src in loader.source_urls for u in src]), "unreadable": dict(loader.unreadable_shards),
            "n": n, "skipped": dict(loader.skipped), "s1": s1.tolist(), "s2": s2.tolist(), "npix": npix,
            "lengths": lengths}


def _summarise(raws: list[dict], *, image_size: int, max_length: int) -> dict:
    npix = sum(r["npix"] for r in raws)
    s1 = [sum(r["s1"][c] for r in raws) for c in range(3)]
    s2 = [sum(r["s2"][c] for r in raws) for c in range(3)]
    mean = [v / max(npix, 1) for v in s1]
    std = [math.sqrt(max(q / max(npix, 1) - m * m, 0.0)) for q, m in zip(s2, mean)]
    skipped: dict[str, int] = {}
    unreadable: dict[str, str] = {}
    for r in raws:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        unreadable.update(r["unreadable"])
    lengths = sorted(v for r in raws for v in r["lengths"])
    return {
        "shards": sum(r["shards"] for r in raws),
        "unreadable_shards": unreadable,
        "samples": sum(r["n"] for r in raws),
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "pixel_mean": [round(v, 5) for v in mean],
        "pixel_std": [round(v, 5) for v in std],
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


def compute_stats(shards: str | list[str], *, tokenizer, max_length: int = 32, image_size: int = 64,
                  num_workers: int = 0, batch_size: int = 64, max_image_pixels: int | None = None,
                  by_split: bool = False) -> dict:
    """The statistics of ``shards`` as one set; with ``by_split`` (``shards`` a pattern or a
    directory) also ``"splits": {name: stats}``, one entry per split (:func:`group_splits`),
    and the totals over all of them at the top level."""
    kw = dict(tokenizer=tokenizer, max_length=max_length, image_size=image_size, num_workers=num_workers,
              batch_size=batch_size, max_image_pixels=max_image_pixels)
    if not by_split or not isinstance(shards, str):
        return _summarise([_accumulate(shards, **kw)], image_size=image_size, max_length=max_length)
    raws = {name: _accumulate(urls, **kw) for name, urls in group_splits(shards).items()}
    total = _summarise(list(raws.values()), image_size=image_size, max_length=max_length)
    total["splits"] = {name: _summarise([r], image_size=image_size, max_length=max_length) for name, r in raws.items()}
    return total


def _print_block(stats: dict, max_length: int, indent: str = "") -> None:
    ct = stats["caption_tokens"]
    print(f"{indent}pixel mean (0-1): {stats['pixel_mean']}  std: {stats['pixel_std']}")
    print(f"{indent}caption tokens: mean {ct['mean']} p50 {ct['p50']} p95 {ct['p95']} max {ct['max']}; "
          f"max_length={max_length} truncates {100 * stats['truncated_share']:.2f}%")


def main(argv: list[str] | None = None) -> int:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="mmpretrain shards stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="e.g. `mmpretrain shards stats shards/synthetic` (train, val and classify "
                                       "apart), `mmpretrain shards stats 'shards/coco/val-*.tar'`")
    p.add_argument("shards", metavar="DIR|PATTERN",
                   help="shard directory (its *.tar and split subdirectories), brace/glob pattern or URL "
                        "(http(s)://, s3://, pipe:)")
    p.add_argument("--max-length", type=int, default=d.max_length, metavar="N",
                   help=f"the training text length (data.max_length): the share of captions longer than N tokens "
                        f"is reported as truncated (default: {d.max_length})")
    p.add_argument("--tokenizer", default="auto", metavar="SPEC",
                   help="'auto' (the tokenizer/ folder beside the shards; trained in memory from the captions if "
                        "missing, nothing written), a tokenizer directory or a hub name (default: auto)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, metavar="V",
                   help=f"vocabulary of the in-memory tokenizer when 'auto' finds none (default: {d.vocab_size})")
    p.add_argument("--image-size", type=int, default=d.image_size, metavar="PX",
                   help=f"images are center-cropped to PX x PX (data.image_size) before the pixel statistics "
                        f"(default: {d.image_size})")
    p.add_argument("--workers", type=int, default=0, metavar="W",
                   help="DataLoader worker processes reading the shards (default: 0, in this process)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    from mmpretrain.data.shardio import expand_sources
    from mmpretrain.data.tokenizer import load_tokenizer

    try:
        if not expand_sources(args.shards):  # before the tokenizer, which would complain instead
            raise ValueError(f"no shards match {args.shards}")
        tok = load_tokenizer(args.tokenizer, [args.shards], args.vocab_size, save=False)
        stats = compute_stats(args.shards, tokenizer=tok, max_length=args.max_length,
                              image_size=args.image_size, num_workers=args.workers, by_split=True)
    except ValueError as e:
        print(f"mmpretrain shards stats: {e}", file=sys.stderr)
        return 2
    splits = stats.get("splits", {})
    if len(splits) > 1:
        for name, st in splits.items():
            skipped = ", ".join(f"{k}={v}" for k, v in sorted(st["skipped"].items())) or "none"
            print(f"split {name}: shards: {st['shards']}  samples read: {st['samples']}  skipped: "
                  f"{st['skipped_total']} ({skipped})")
            _print_block(st, args.max_length, "  ")
        print(f"all {len(splits)} splits:")
    print(f"shards: {stats['shards']}  samples read: {stats['samples']}  skipped: {stats['skipped_total']}")
    for url, why in stats["unreadable_shards"].items():
        print(f"unreadable shard (no sample read): {url}: {why}")
    for reason, count in sorted(stats["skipped"].items()):
        print(f"  skipped {reason}: {count}")
    _print_block(stats, args.max_length)
    print(json.dumps(stats, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
