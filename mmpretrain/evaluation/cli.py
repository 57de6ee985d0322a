"""`mmpretrain eval`: zero-shot retrieval + ITM re-ranking of a checkpoint (or an export).

    mmpretrain eval --checkpoint runs/x/checkpoints/step_00000200 --shards 'shards/synthetic/val-*.tar' \
        [--out DIR] [eval.itm_rerank_k=32 data.batch_size=64 ...]

Runs in one process (no process group), or on N processes under a launcher
(``torchrun --nproc_per_node N -m mmpretrain.evaluation.cli ...`` or ``accelerate launch``):
each rank embeds its share of the shards and the results are merged (evaluation.evaluate).
``mmpretrain.runtime.start_if_launched`` builds and checks the Accelerator (no DDP/DeepSpeed
wrapping: every rank holds the full model) and ends it.
Overrides apply to the checkpoint's own config (``eval.*``, ``data.batch_size``,
``data.num_workers``, ...). Writes ``metrics.json``, ``report.html`` and ``report.png`` into
``--out`` (default: ``RUN/eval/step_N`` beside the run's checkpoints) and prints the metrics
JSON as its last line. The compositional test and the ITM accuracy on hard negatives
(``eval.compositional``, ``eval.itm_hard_negatives``) are part of it; when one is skipped (no
scene metadata in the shards, no trained ITM head) a one-line note goes to stderr. Bad input
prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _apply_overrides(cfg, overrides: list[str]):
    from mmpretrain.config import config_from_dict, parse_overrides, to_dict

    tree = to_dict(cfg)
    for key, value in parse_overrides(overrides):
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config_from_dict(tree)


def default_out_dir(checkpoint: Path, step: int) -> Path:
    """``RUN/eval/step_N`` for ``RUN/checkpoints/step_N`` (where the trainer's own evaluation
    writes); ``PATH-eval`` beside anything else (an export stays as it was exported)."""
    from mmpretrain.export.format import step_dir_name

    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / step_dir_name(step)
    return checkpoint.with_name(checkpoint.name + "-eval")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmpretrain eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, export directory, or a run "
                   "directory (its newest complete checkpoints/step_N)")
    p.add_argument("--shards", default=None, help="held-out shards (default: the checkpoint's data.val_shards)")
    p.add_argument("--out", default=None, help="output directory for metrics.json and the report")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    from mmpretrain.config import ConfigError
    from mmpretrain.evaluation.evaluate import run_evaluation
    from mmpretrain.export import ExportError, load_checkpoint
    from mmpretrain.export.format import checkpoint_of_run

    try:
        ckpt, from_run = checkpoint_of_run(args.checkpoint)
        if from_run:
            print(f"mmpretrain eval: {args.checkpoint} is a run directory; evaluating its newest checkpoint {ckpt}",
                  file=sys.stderr)
            args.checkpoint = str(ckpt)  # the default --out and the report name the checkpoint itself
        loaded = load_checkpoint(args.checkpoint)
        overrides = list(args.overrides) + ([f"data.val_shards={args.shards}"] if args.shards else [])
        cfg = _apply_overrides(loaded.cfg, overrides)
    except (ExportError, ConfigError) as e:
        print(f"mmpretrain eval: error: {e}", file=sys.stderr)
        return 2
    from mmpretrain import runtime as rt

    try:
        runtime = rt.start_if_launched()
    except rt.LaunchError as e:
        print("mmpretrain eval: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        return 2
    with runtime:  # the one teardown: every rank waits for the others, then the group ends
        return _evaluate(args, cfg, loaded, runtime, run_evaluation)


def _evaluate(args, cfg, loaded, runtime, run_evaluation) -> int:
    model = loaded.model.to(runtime.device)
    out = Path(args.out) if args.out else default_out_dir(Path(args.checkpoint), loaded.step)
    # A world size that does not divide the batch is not an error for evaluation: round it up.
    world = runtime.world_size
    if cfg.data.batch_size % world:
        cfg.data.batch_size += world - cfg.data.batch_size % world
    try:
        metrics = run_evaluation(model, cfg, runtime.accelerator, loaded.tokenizer, loaded.step, out,
                                 checkpoint=args.checkpoint)
    except ValueError as e:  # e.g. no shards match the pattern, a sample key in two shards
        print(f"mmpretrain eval: error: {e}", file=sys.stderr)
        return 2
    if runtime.is_main:
        for name in ("compositional", "itm_hard_negatives"):
            if isinstance(metrics.get(name), dict) and "skipped" in metrics[name]:
                print(f"mmpretrain eval: note: {name} skipped: {metrics[name]['skipped']}", file=sys.stderr)
        print(f"wrote {out / 'metrics.json'}" + (f", {out / 'report.html'}, {out / 'report.png'}" if cfg.eval.report else ""))
        print(json.dumps(metrics))
    return 0

if __name__ == "__main__":
    sys.exit(main())
