"""`mmpretrain eval`: zero-shot retrieval + ITM re-ranking of a checkpoint (or an export).

    mmpretrain eval --checkpoint runs/x/checkpoints/step_00000200 --shards 'shards/synthetic/val-*.tar' \
        [--out DIR] [eval.itm_rerank_k=32 data.batch_size=64 ...]

Runs in one process (no process group), or on N processes under a launcher
(``torchrun --nproc_per_node N -m mmpretrain.evaluation.cli ...`` or ``accelerate launch``):
each rank embeds its share of the shards and the results are merged (evaluation.evaluate).
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
    from mmpretrain.trainer.checkpoint import step_dir_name

    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / step_dir_name(step)
    return checkpoint.with_name(checkpoint.name + "-eval")


def build_eval_accelerator():
    """An Accelerator when a launcher started several processes, else None.

    The launch is read and checked by the trainer's own ``accel.launch_info()`` /
    ``accel.check_accelerator()`` (no GPU: gloo, through ``cpu=True``, or DeepSpeed's own gloo
    group when the launch config asks for DeepSpeed). Evaluation needs no DDP/DeepSpeed
    wrapping: every rank holds the full model. ``release_eval_accelerator`` ends the group.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from mmpretrain.trainer.accel import LaunchError, check_accelerator, launch_info

    info = launch_info()
    if not info.launched or info.world_size == 1:
        return None
    kwargs: dict = {}
    if info.use_deepspeed:  # Accelerate sets DeepSpeed up from the launch environment
        if not info.has_gpu:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif not info.has_gpu:
        kwargs["cpu"] = True
    acc = Accelerator(**kwargs)
    try:
        check_accelerator(acc, info)
    except LaunchError:
        release_eval_accelerator(acc)
        raise
    return acc


def release_eval_accelerator(accelerator) -> None:
    """End the process group ``build_eval_accelerator`` started and forget Accelerate's
    process-wide state (so a later Accelerator in the same process starts afresh)."""
    if accelerator is None:
        return
    from accelerate.state import AcceleratorState, GradientState

    # every rank past its last collective before the group goes: destroying a gloo group while
    # the peer still runs its final gather aborted a rank at exit (3 of 8 runs without this)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the default process group
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmpretrain eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or export directory")
    p.add_argument("--shards", default=None, help="held-out shards (default: the checkpoint's data.val_shards)")
    p.add_argument("--out", default=None, help="output directory for metrics.json and the report")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    from mmpretrain.config import ConfigError
    from mmpretrain.evaluation.evaluate import run_evaluation
    from mmpretrain.export import ExportError, load_checkpoint

    try:
        loaded = load_checkpoint(args.checkpoint)
        overrides = list(args.overrides) + ([f"data.val_shards={args.shards}"] if args.shards else [])
        cfg = _apply_overrides(loaded.cfg, overrides)
    except (ExportError, ConfigError) as e:
        print(f"mmpretrain eval: error: {e}", file=sys.stderr)
        return 2
    from mmpretrain.trainer.accel import LaunchError

    try:
        accelerator = build_eval_accelerator()
    except LaunchError as e:
        print("mmpretrain eval: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        return 2
    try:
        return _evaluate(args, cfg, loaded, accelerator, run_evaluation)
    finally:
        release_eval_accelerator(accelerator)


def _evaluate(args, cfg, loaded, accelerator, run_evaluation) -> int:
    import torch

    device = accelerator.device if accelerator is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device)
    out = Path(args.out) if args.out else default_out_dir(Path(args.checkpoint), loaded.step)
    # A world size that does not divide the batch is not an error for evaluation: round it up.
    world = accelerator.num_processes if accelerator is not None else 1
    if cfg.data.batch_size % world:
        cfg.data.batch_size += world - cfg.data.batch_size % world
    try:
        metrics = run_evaluation(model, cfg, accelerator, loaded.tokenizer, loaded.step, out,
                                 checkpoint=args.checkpoint)
    except ValueError as e:  # e.g. no shards match the pattern, a sample key in two shards
        print(f"mmpretrain eval: error: {e}", file=sys.stderr)
        return 2
    if accelerator is None or accelerator.is_main_process:
        for name in ("compositional", "itm_hard_negatives"):
            if isinstance(metrics.get(name), dict) and "skipped" in metrics[name]:
                print(f"mmpretrain eval: note: {name} skipped: {metrics[name]['skipped']}", file=sys.stderr)
        print(f"wrote {out / 'metrics.json'}" + (f", {out / 'report.html'}, {out / 'report.png'}" if cfg.eval.report else ""))
        print(json.dumps(metrics))
    return 0

if __name__ == "__main__":
    sys.exit(main())
