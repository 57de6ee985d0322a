"""`mmpretrain pipeline`: the whole job on the embedded default, on CPU, offline.

    make synthetic shards -> train (single process) -> evaluate (retrieval, compositional,
    zero-shot classification of the shape and colour labels of DIR/classify/) -> export -> reload

Each stage calls the same ``main(argv)`` as its own sub-command, so this is exactly what a
user would type, in order. Shards made earlier with the same sizes are reused; training starts
afresh in ``--out`` and the export there is replaced, so the command can be re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _stage(name: str, fn, argv: list[str]) -> None:
    print(f"\n=== {name}: mmpretrain {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = fn(argv[1:])
    if rc:
        raise SystemExit(f"mmpretrain pipeline: stage '{name}' failed with exit code {rc}")
    print(f"=== {name} done in {time.perf_counter() - t0:.1f}s", flush=True)


def resolve_config(path: str | Path) -> Path:
    """A config path as given, or else under the repository's configs/ (editable install), so the
    embedded default is found from any directory."""
    config = Path(path)
    if not config.is_file() and not config.is_absolute():
        repo_config = Path(__file__).resolve().parent.parent / config
        if not repo_config.is_file():
            raise SystemExit(f"mmpretrain: config not found: {config} "
                             "(run from the repository root or pass --config)")
        config = repo_config
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmpretrain pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="training config (default: configs/tiny.yaml)")
    p.add_argument("--shards", default="shards/synthetic", help="synthetic shard directory (default: shards/synthetic)")
    p.add_argument("--out", default="runs/pipeline", help="run directory (default: runs/pipeline)")
    p.add_argument("--num-samples", type=int, default=20000, help="synthetic training pairs (default: 20000)")
    p.add_argument("--num-val", type=int, default=1000, help="held-out images (default: 1000)")
    p.add_argument("--num-classify", type=int, default=None,
                   help="images of the zero-shot classification split SHARDS/classify/ (default: 800, or "
                   "--num-val when that is smaller; 0: no zero-shot evaluation)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides applied to --config, e.g. train.max_steps=100 "
                        "(default: none; `mmpretrain train --print-config` lists every key)")
    args = p.parse_args(argv)
    if args.num_classify is None:
        args.num_classify = min(800, args.num_val)

    from mmpretrain.data import cli as shards_cli
    from mmpretrain import train as train_cli
    from mmpretrain.evaluation import cli as eval_cli
    from mmpretrain.export import cli as export_cli
    from mmpretrain.export.format import find_latest_checkpoint

    shards, out = Path(args.shards), Path(args.out)
    config = resolve_config(args.config)
    manifest = shards / "manifest.json"
    if manifest.is_file():
        splits = json.loads(manifest.read_text()).get("splits", {})
        have = (splits.get("train", {}).get("num_samples"), splits.get("val", {}).get("num_images"))
        if have != (args.num_samples, args.num_val):
            raise SystemExit(f"mmpretrain pipeline: {shards} holds {have[0]} training pairs and {have[1]} "
                             f"held-out images, not the {args.num_samples} and {args.num_val} asked for; "
                             "delete it or pass another --shards directory")
        print(f"=== shards: reusing {shards} (delete it to rebuild)")
        classify_manifest = shards / "classify" / "manifest.json"
        have_classify = (json.loads(classify_manifest.read_text()).get("splits", {}).get("classify", {})
                         .get("num_images") if classify_manifest.is_file() else 0)
        if args.num_classify > 0 and have_classify != args.num_classify:
            # shards made before the classify split existed: add it (train/val stay as they are)
            from mmpretrain.data.synthetic import write_classify_split

            synth = json.loads(manifest.read_text()).get("synthetic", {})
            print(f"=== shards: writing the zero-shot split {shards / 'classify'} ({args.num_classify} images)")
            write_classify_split(shards, args.num_classify, seed=int(synth.get("seed", 0)),
                                 image_size=int(synth.get("image_size", 64)))
    else:
        _stage("shards", shards_cli.main, ["shards", "synthetic", "--out", str(shards),
                                           "--num-samples", str(args.num_samples),
                                           "--num-val", str(args.num_val),
                                           "--num-classify", str(args.num_classify)])
    train_argv = ["train", "--config", str(config), f"train.output_dir={out}",
                  f"data.train_shards=[{shards}/train-*.tar]",
                  f"data.val_shards={shards}/val-*.tar",
                  # the eval stage below evaluates the final checkpoint; don't do it twice
                  "train.eval_at_end=false", *args.overrides]
    _stage("train", train_cli.main, train_argv)
    ckpt = find_latest_checkpoint(out)
    if ckpt is None:
        raise SystemExit(f"mmpretrain pipeline: training wrote no checkpoint under {out}")
    classify = (["--classify", str(shards / "classify"), "--label-field", "label,color"]
                if args.num_classify > 0 else [])
    _stage("eval", eval_cli.main, ["eval", "--checkpoint", str(ckpt),
                                   "--shards", f"{shards}/val-*.tar", "--out", str(out / "eval"), *classify])
    _stage("export", export_cli.main, ["export", "--checkpoint", str(ckpt),
                                       "--out", str(out / "export"), "--force"])

    # Reload the export the way a downstream user would, without the trainer.
    import mmpretrain

    model = mmpretrain.load_pretrained(out / "export")
    texts = ["a red circle left of a blue square", "a green triangle"]
    emb = model.embed_texts(texts)
    print(f"\n=== reload: load_pretrained({out / 'export'}) -> text embeddings {tuple(emb.shape)}")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for result in (metrics.get("zero_shot") or {}).values():
        print(f"=== zero-shot ({result['label_field']}): top-1 {result['top1']:.1f} %"
              + (f", ITM re-scored {result['itm']['top1']:.1f} %" if "top1" in result.get("itm", {}) else "")
              + f" (chance {result['chance_top1']:.1f} %)")
    print(f"=== report: {out / 'eval' / 'report.html'}")
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
