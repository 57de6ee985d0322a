"""``mmpretrain shards synthetic|build|stats``: make, build and inspect WebDataset shards.

Bad input gives a one-line ``mmpretrain shards: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from mmpretrain.data.shardwriter import ShardsError

PROG = "mmpretrain shards"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Make, build and inspect WebDataset shards.")
    sub = parser.add_subparsers(dest="command", metavar="{synthetic,build,stats}")

    syn = sub.add_parser(
        "synthetic",
        help="procedurally drawn image-caption pairs (train + val splits) and their tokenizer",
        description="Write DIR/train-NNNNNN.tar (1 caption per image), DIR/val-NNNNNN.tar (2 captions "
        "per image), DIR/manifest.json, DIR/tokenizer/ (WordPiece trained on the train captions) and "
        "DIR/classify/ (one object per image, json 'label' = its shape, 'color' = its colour: the zero-shot "
        "classification set of `mmpretrain eval --classify DIR/classify`; its own manifest and seed stream, "
        "so the train/val shards do not depend on it).",
    )
    syn.add_argument("--out", required=True, metavar="DIR", help="output directory, e.g. shards/synthetic; required")
    syn.add_argument("--num-samples", type=int, required=True, metavar="N", help="train images (1 caption each); required")
    syn.add_argument("--num-val", type=int, default=1000, metavar="N",
                     help="held-out images, 2 captions each (default: 1000; 0: no val split)")
    syn.add_argument("--num-classify", type=int, default=800, metavar="N",
                     help="images of the labelled one-object split DIR/classify/ (default: 800, every "
                     "(shape, colour) pair 10 times; 0: none)")
    syn.add_argument("--seed", type=int, default=0, metavar="S", help="dataset seed (default: 0)")
    syn.add_argument("--samples-per-shard", type=int, default=512, metavar="K",
                     help="samples per tar (default: 512)")
    syn.add_argument("--image-size", type=int, default=64, metavar="PX", help="square image side (default: 64)")
    syn.add_argument("--vocab-size", type=int, default=4096, metavar="V", help="tokenizer vocabulary (default: 4096)")
    syn.add_argument("--no-tokenizer", action="store_true", help="do not train DIR/tokenizer/ (default: train it)")

    from mmpretrain.data.build import DEFAULT_MAX_PIXELS, FORMATS

    bld = sub.add_parser(
        "build",
        help="real sources (image folder, csv, jsonl, COCO, Flickr30K/Karpathy, WebDataset) -> shards",
        description="Write OUT/<name>-NNNNNN.tar and OUT/manifest.json. Bad images are converted to RGB or "
        "skipped and counted; re-running an interrupted build finishes it.",
    )
    bld.add_argument("--format", required=True, choices=FORMATS,
                     help="the source layout (required): folder = images with same-name .txt captions; csv = a "
                     ".csv/.tsv whose header names an image and a caption column (image,caption); jsonl = "
                     '{"image": ..., "caption": ...} per line; coco = a COCO captions json; flickr30k = a Karpathy '
                     "split json; webdataset = existing tars (img2dataset output)")
    bld.add_argument("--input", required=True, metavar="PATH",
                     help="image dir (folder), .csv/.jsonl/.json file, or tar dir/pattern (webdataset); required")
    bld.add_argument("--out", required=True, metavar="DIR", help="output directory, e.g. shards/coco; required")
    bld.add_argument("--name", default="data", help="shard file prefix / manifest split (default: data)")
    bld.add_argument("--images", metavar="DIR",
                     help="image root for csv/jsonl/coco/flickr30k (default: the input's folder)")
    bld.add_argument("--samples-per-shard", type=int, default=1000, metavar="K",
                     help="samples (image-caption pairs) per tar (default: 1000)")
    bld.add_argument("--max-side", type=int, default=512, metavar="PX",
                     help="downscale so the longer side is at most PX, keeping aspect ratio (default: 512; 0: keep)")
    bld.add_argument("--jpeg-quality", type=int, default=90, metavar="Q", help="re-encoding quality (default: 90)")
    bld.add_argument("--workers", type=int, default=None, metavar="W",
                     help="decode/encode processes (default: min(8, CPUs); 0: in this process)")
    bld.add_argument("--split", metavar="S", help="flickr30k: keep only these of train/val/test/restval, comma-separated (default: all)")
    bld.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                     help=f"skip images with more pixels, read from the header (default: {DEFAULT_MAX_PIXELS})")
    bld.add_argument("--overwrite", action="store_true", help="rebuild a split made from other input/settings (default: refuse, naming the split)")

    sub.add_parser("stats", add_help=False,
                   help="what the loader sees: samples, skips, pixel mean/std, caption tokens (DIR or PATTERN)")
    return parser


def _summary(manifest: dict, out: str, splits: list[str]) -> str:
    lines = []
    for split in splits:
        entry = manifest["splits"].get(split, {})
        lines.append(f"{out}: {split}: {entry.get('num_samples', 0)} samples in {len(entry.get('shards', []))} shards")
        if entry.get("skipped"):
            lines.append("  skipped: " + ", ".join(f"{k}={v}" for k, v in entry["skipped"].items()))
            named = entry.get("skipped_files") or []
            total = sum(entry["skipped"].values())
            if named:
                more = f"; the first {len(named)} named, the counts above are samples" if total > len(named) else ""
                lines.append(f"  skipped files (reason: file: why{more}; also in {out}/manifest.json):")
                lines += [f"    {line}" for line in named]
        if entry.get("converted"):
            lines.append("  converted to RGB: " + ", ".join(f"{k}={v}" for k, v in entry["converted"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "stats":  # owned by mmpretrain.data.stats, which parses its own options
        from mmpretrain.data import stats

        return int(stats.main(argv[1:]) or 0)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, printed by argparse)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "synthetic":
            from mmpretrain.data.synthetic import generate

            manifest = generate(
                args.out, args.num_samples, num_val=args.num_val, seed=args.seed,
                samples_per_shard=args.samples_per_shard, image_size=args.image_size,
                vocab_size=args.vocab_size, train_tokenizer=not args.no_tokenizer,
                num_classify=args.num_classify,
            )
            print(_summary(manifest, args.out, [s for s in ("train", "val") if s in manifest["splits"]]))
            if args.num_classify > 0:
                from mmpretrain.data.shardwriter import read_manifest
                from mmpretrain.data.synthetic import CLASSIFY_DIR

                classify_dir = f"{args.out.rstrip('/')}/{CLASSIFY_DIR}"
                print(_summary(read_manifest(classify_dir), classify_dir, ["classify"]))
        else:
            from mmpretrain.data.build import BuildOptions, build

            opts = BuildOptions(
                format=args.format, input=args.input, out=args.out, name=args.name, images=args.images,
                samples_per_shard=args.samples_per_shard, max_side=args.max_side,
                jpeg_quality=args.jpeg_quality, workers=args.workers, split=args.split,
                max_pixels=args.max_pixels, overwrite=args.overwrite,
            )
            print(_summary(build(opts), args.out, [args.name]))
    except (ShardsError, OSError) as err:  # bad input/settings, unwritable output: one clear line
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["main", "ShardsError"]
