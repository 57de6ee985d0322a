"""`mmpretrain bench quality`: what the default learns at a fixed budget, per seed.

For each seed: train the config (default ``configs/tiny.yaml``) for ``--steps`` optimizer steps
on the synthetic shards (made first if missing, as ``mmpretrain pipeline`` does), then run the
held-out evaluation of ``mmpretrain eval`` on the final checkpoint. Everything goes through the
same commands a user runs (``train.main``, ``eval.main``), so the numbers are the product's.

Printed per seed, then as the LAST line one JSON object::

  {"bench": "quality", "config": ..., "steps": N, "seeds": [...], "runs": [{seed, mean_recall,
   itm_mean_recall, itm_hard_negative_acc, compositional: {kind: {cosine, itm}}, train_s,
   eval_s, wall_s}, ...], "mean": {...}, "std": {...}}

``mean_recall`` is the contrastive (cosine) mean of R@1/5/10 both ways; ``itm_mean_recall``
the same after ITM re-ranking of the top ``eval.itm_rerank_k`` (by ``eval.itm_rerank_score``,
named in ``itm_rerank_score``); ``itm_hard_negative_acc`` the
balanced ITM accuracy on held-out mined hard negatives; compositional accuracies are the share
of one-change captions the true caption beats (chance 0.5). Figures: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path


def _flat(metrics: dict) -> dict:
    """The headline numbers of one ``metrics.json``."""
    out = {"mean_recall": metrics.get("mean_recall"), "itm_mean_recall": metrics.get("itm_mean_recall"),
           "itm_seconds": metrics.get("itm_seconds"), "itm_rerank_score": metrics.get("itm_rerank_score")}
    hard = metrics.get("itm_hard_negatives") or {}
    out["itm_hard_negative_acc"] = hard.get("balanced_acc")
    out["itm_hard_negative_pos_acc"] = hard.get("positive_acc")
    out["itm_hard_negative_neg_acc"] = hard.get("negative_acc")
    comp = metrics.get("compositional") or {}
    kinds = comp.get("kinds") or {}
    out["compositional"] = {k: {"cosine": v.get("cosine_acc"), "itm": v.get("itm_acc"), "n": v.get("n")}
                            for k, v in kinds.items()}
    return out


def _stats(runs: list[dict]) -> tuple[dict, dict]:
    def collect(get):
        vals = [get(r) for r in runs]
        vals = [v for v in vals if isinstance(v, (int, float))]
        if not vals:
            return None, None
        m = sum(vals) / len(vals)
        s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return round(m, 4), round(s, 4)

    mean, std = {}, {}
    for key in ("mean_recall", "itm_mean_recall", "itm_hard_negative_acc", "train_s", "eval_s", "wall_s"):
        mean[key], std[key] = collect(lambda r, k=key: r.get(k))
    kinds = sorted({k for r in runs for k in r.get("compositional", {})})
    for kind in kinds:
        for how in ("cosine", "itm"):
            m, s = collect(lambda r, k=kind, h=how: (r.get("compositional", {}).get(k) or {}).get(h))
            mean[f"comp_{kind}_{how}"], std[f"comp_{kind}_{how}"] = m, s
    return mean, std


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmpretrain bench quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="training config (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--seeds", default="0",
                   help="comma-separated config seeds (weights and data order), one run each, e.g. 0,1,2 "
                        "(default: %(default)s)")
    p.add_argument("--shards", default="shards/synthetic",
                   help="synthetic shard directory, made if missing (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=20000, help="synthetic training pairs (default: %(default)s)")
    p.add_argument("--num-val", type=int, default=1000, help="held-out images (default: %(default)s)")
    p.add_argument("--out", default="runs/bench_quality", help="run directories go under here (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (applied to every run)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    try:
        args.seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    if not args.seeds:
        p.error("--seeds: give at least one seed")

    from mmpretrain import train as train_cli
    from mmpretrain.data import cli as shards_cli
    from mmpretrain.evaluation import cli as eval_cli
    from mmpretrain.export.format import find_latest_checkpoint
    from mmpretrain.pipeline import resolve_config

    config = resolve_config(args.config)
    shards = Path(args.shards)
    if not (shards / "manifest.json").is_file():
        rc = shards_cli.main(["synthetic", "--out", str(shards), "--num-samples", str(args.num_samples),
                              "--num-val", str(args.num_val)])
        if rc:
            return rc
    runs = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        if out.exists():  # this bench's own run directory: always a fresh run
            shutil.rmtree(out)
        t0 = time.perf_counter()
        rc = train_cli.main(["--config", str(config), f"train.output_dir={out}", f"seed={seed}",
                             f"train.max_steps={args.steps}", f"data.train_shards=[{shards}/train-*.tar]",
                             f"data.val_shards={shards}/val-*.tar", "train.eval_at_end=false",
                             "train.progress_bar=false", *args.overrides])
        if rc:
            print(f"mmpretrain bench quality: training seed {seed} failed (exit {rc})", file=sys.stderr)
            return rc
        t1 = time.perf_counter()
        ckpt = find_latest_checkpoint(out)
        if ckpt is None:
            print(f"mmpretrain bench quality: no checkpoint under {out}", file=sys.stderr)
            return 1
        rc = eval_cli.main(["--checkpoint", str(ckpt), "--shards", f"{shards}/val-*.tar", "--out", str(out / "eval")])
        if rc:
            return rc
        t2 = time.perf_counter()
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        run = {"seed": seed, **_flat(metrics), "train_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1),
               "wall_s": round(t2 - t0, 1)}
        runs.append(run)
        print(f"=== quality seed {seed}: {json.dumps(run)}", flush=True)
    mean, std = _stats(runs)
    print(json.dumps({"bench": "quality", "config": str(args.config), "steps": args.steps, "seeds": args.seeds,
                      "overrides": args.overrides, "runs": runs, "mean": mean, "std": std}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
