"""`mmpretrain eval`: zero-shot retrieval + ITM re-ranking of a checkpoint (or an export).

    mmpretrain eval --checkpoint runs/x/checkpoints/step_00000200 --shards 'shards/synthetic/val-*.tar' \
        [--out DIR] [eval.itm_rerank_k=32 data.global_batch_size=64 ...]

Runs in one process (no process group), or on N processes under a launcher
(``torchrun --nproc_per_node N -m mmpretrain.evaluation.cli ...`` or ``accelerate launch``):
each rank embeds its share of the shards and the results are merged (evaluation.evaluate).
``mmpretrain.runtime.start_if_launched`` builds and checks the Accelerator (no DDP/DeepSpeed
wrapping: every rank holds the full model) and ends it.
Overrides apply to the checkpoint's own config (``eval.*``, ``data.global_batch_size``,
``data.num_workers``, ...). Writes ``metrics.json``, ``report.html`` and ``report.png`` into
``--out`` (default: ``RUN/eval/step_N`` beside the run's checkpoints) and prints the metrics
JSON as its last line. ``--classify DIR`` adds zero-shot classification (an ImageFolder tree
or shards whose sample json names the class in ``label``; ``mmpretrain shards synthetic``
writes ``DIR/classify/``): top-1/top-5/per-class accuracy, contrastive and ITM re-scored,
printed as a table, written to ``zero_shot.json`` and under ``"zero_shot"`` in
``metrics.json`` (keyed by label field), and shown in the report; ``--classify-only`` skips the
retrieval evaluation. The compositional test and the ITM accuracy on hard negatives
(``eval.compositional``, ``eval.itm_hard_negatives``) are part of it; when one is skipped (no
scene metadata in the shards, no trained ITM head) a one-line note goes to stderr. Bad input
prints one line and exits 2; a ``--shards`` pattern that matches no file (a brace pattern
whose files are all missing), or without ``--shards`` the checkpoint's saved ``data.val_shards``
(an export's default one), is refused before the model is loaded.
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


def _val_shards_to_check(args, checkpoint: Path) -> tuple[str, str, str] | None:
    """``(pattern, what names it, hint)``: the held-out shards ``mmpretrain eval`` will read,
    found from the files alone (nothing loaded): ``--shards``; else the checkpoint's saved
    ``data.val_shards`` (``mmpretrain.json``), or for an export (``config.json``, which saves no
    data config) the default ``data.val_shards`` that ``load_checkpoint`` gives it, either after
    the command's overrides (a ``data.val_shards=`` override is named as the key alone).
    ``None`` (no check) with ``--classify-only`` (the shards are not read), when ``checkpoint``
    is plainly no checkpoint, and without ``--shards`` when ``mmpretrain.json``/``config.json``
    or its config does not parse or the export is of another format: ``load_checkpoint`` names
    those first."""
    import warnings

    from mmpretrain.config import Config, config_from_dict, parse_overrides
    from mmpretrain.export.format import CKPT_META, EXPORT_FORMAT

    meta_file, export_file = checkpoint / CKPT_META, checkpoint / "config.json"
    if args.classify_only or not checkpoint.is_dir() or not (meta_file.is_file() or export_file.is_file()):
        return None
    if args.shards:
        return args.shards, "--shards (data.val_shards)", ""
    try:
        with warnings.catch_warnings():  # a renamed key warns once, when the checkpoint is loaded
            warnings.simplefilter("ignore")
            if meta_file.is_file():  # load_checkpoint reads a checkpoint when both files are there
                named, source = meta_file, "the checkpoint's held-out shards"
                cfg = config_from_dict(json.loads(meta_file.read_text())["config"])
            else:
                named, source = export_file, "the default; an export saves no data config"
                if json.loads(export_file.read_text()).get("format") != EXPORT_FORMAT:
                    return None
                cfg = Config()  # as _load_export_as_checkpoint builds it: data.val_shards not set
            spec = _apply_overrides(cfg, list(args.overrides)).data.val_shards
            overridden = any(key == "data.val_shards" for key, _ in parse_overrides(list(args.overrides)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # load_checkpoint names these
        return None
    if overridden:
        return spec, "data.val_shards", ""
    return spec, f"{named}: data.val_shards ({source})", "; pass --shards PATTERN to evaluate on others"


def _check_val_shards(args, checkpoint: Path) -> None:
    """``ConfigError`` (one line naming where the pattern came from, the pattern and its missing
    files) when the held-out shards eval will read (``_val_shards_to_check``) match no file (a
    brace pattern whose files are all missing, a glob matching nothing): checked on the files
    alone, before the model is loaded."""
    from mmpretrain.data.shardio import shards_missing

    found = _val_shards_to_check(args, checkpoint)
    if found is None:
        return
    pattern, named, hint = found
    why = shards_missing(pattern)
    if why:
        from mmpretrain.config import ConfigError

        raise ConfigError(f"{named}: {why}{hint}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmpretrain eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, export directory, or a run "
                   "directory (its newest complete checkpoints/step_N)")
    p.add_argument("--shards", default=None, help="held-out shards (default: the checkpoint's data.val_shards)")
    p.add_argument("--out", default=None, help="output directory for metrics.json and the report "
                   "(default: RUN/eval/step_N beside the checkpoints, PATH-eval for an export)")
    p.add_argument("--classify", default=None, metavar="DIR",
                   help="zero-shot classification set: an ImageFolder tree (one folder per class, "
                   "underscores read as spaces) or labelled WebDataset shards (a directory, glob or brace "
                   "pattern; e.g. shards/synthetic/classify) (default: eval.classify from the config, empty: none)")
    p.add_argument("--label-field", default=None, metavar="F[,F...]",
                   help="shards: sample-json field(s) holding the class name, comma-separated for several "
                   "labellings (default: eval.classify_label_field, 'label'; the synthetic split also has 'color')")
    p.add_argument("--templates", action="append", default=None, metavar="T",
                   help="prompt template with {} for the class name, or a file of templates (one per line); "
                   "repeat for several (default: eval.classify_templates, else the dataset manifest's templates, "
                   "else 'a photo of a {}.', 'a picture of a {}.', 'an image of a {}.', 'a {}.')")
    p.add_argument("--classify-only", action="store_true",
                   help="only the zero-shot classification, no retrieval evaluation (default: both)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value; zero-shot settings: "
                   "eval.classify_itm_k (default 5: ITM re-scores the top 5 classes; 0: off), "
                   "eval.classify_itm_prompts (default best: the ITM log-odds of the class prompt closest to "
                   "the image; mean: their mean over the templates), eval.classify_max_images (default 0: all), and "
                   "eval.itm_rerank_score (default itm+itc), the combination rule shared with retrieval")
    args = p.parse_args(argv)

    from mmpretrain.config import ConfigError
    from mmpretrain.evaluation.evaluate import run_evaluation
    from mmpretrain.export import ExportError, load_checkpoint
    from mmpretrain.export.format import checkpoint_of_run

    try:
        ckpt, from_run = checkpoint_of_run(args.checkpoint)
        _check_val_shards(args, ckpt)
        if from_run:
            print(f"mmpretrain eval: {args.checkpoint} is a run directory; evaluating its newest checkpoint {ckpt}",
                  file=sys.stderr)
            args.checkpoint = str(ckpt)  # the default --out and the report name the checkpoint itself
        loaded = load_checkpoint(args.checkpoint)
        overrides = list(args.overrides) + ([f"data.val_shards={args.shards}"] if args.shards else [])
        cfg = _apply_overrides(loaded.cfg, overrides)
        if args.classify_only and not (args.classify or cfg.eval.classify):
            raise ConfigError("--classify-only needs --classify DIR (or eval.classify)")
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
    if cfg.data.global_batch_size % world:
        cfg.data.global_batch_size += world - cfg.data.global_batch_size % world
    from mmpretrain.evaluation import classify as classify_mod
    from mmpretrain.evaluation import report as report_mod

    path = args.classify or cfg.eval.classify
    zero_shot = None
    try:
        if path:  # first: bad input fails before the (longer) retrieval evaluation
            zero_shot = _zero_shot(args, cfg, model, loaded.tokenizer, runtime, path, classify_mod)
        if runtime.is_main:
            sidecar = out / report_mod.ZERO_SHOT_FILE
            if zero_shot is not None:  # the report written by run_evaluation shows it
                out.mkdir(parents=True, exist_ok=True)
                sidecar.write_text(json.dumps({"step": int(loaded.step), "checkpoint": str(args.checkpoint),
                                               "zero_shot": zero_shot}, indent=2) + "\n")
            elif sidecar.is_file():  # an earlier run's result is not this evaluation's
                sidecar.unlink()
        if args.classify_only:
            metrics = {"step": int(loaded.step), "zero_shot": zero_shot, "world_size": world}
        else:
            metrics = run_evaluation(model, cfg, runtime.accelerator, loaded.tokenizer, loaded.step, out,
                                     checkpoint=args.checkpoint)
    except ValueError as e:  # e.g. no shards match the pattern, a sample key in two shards, a bad --classify
        print(f"mmpretrain eval: error: {e}", file=sys.stderr)
        return 2
    if zero_shot is not None:
        metrics["zero_shot"] = zero_shot
    if runtime.is_main:
        if zero_shot is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            if args.classify_only and cfg.eval.report:
                from mmpretrain.evaluation.evaluate import find_history

                source = find_history(cfg, out, args.checkpoint)
                report_mod.write_report(out, metrics, report_mod.read_history(source), {}, source,
                                        checkpoint=args.checkpoint)
            for result in zero_shot.values():
                print(classify_mod.format_table(result))
                if "skipped" in result.get("itm", {}):
                    print(f"mmpretrain eval: note: zero-shot ITM re-scoring skipped: {result['itm']['skipped']}",
                          file=sys.stderr)
        for name in ("compositional", "itm_hard_negatives"):
            if isinstance(metrics.get(name), dict) and "skipped" in metrics[name]:
                print(f"mmpretrain eval: note: {name} skipped: {metrics[name]['skipped']}", file=sys.stderr)
        written = [out / "metrics.json"] + ([out / report_mod.ZERO_SHOT_FILE] if zero_shot is not None else [])
        if cfg.eval.report:
            written += [out / "report.html", out / "report.png"]
        print("wrote " + ", ".join(str(w) for w in written))
        print(json.dumps(metrics))
    return 0


def _zero_shot(args, cfg, model, tokenizer, runtime, path: str, classify_mod) -> dict:
    """``{label field (or 'folder' for an ImageFolder tree): classify.zero_shot result}``."""
    fields = [f.strip() for f in (args.label_field or cfg.eval.classify_label_field).split(",") if f.strip()]
    templates, where = classify_mod.resolve_templates(cfg, args.templates)
    results: dict = {}
    for field in fields or [classify_mod.LABEL_FIELD]:
        data = classify_mod.load_classify_set(path, field, int(cfg.eval.classify_max_images))
        key = field if data.format == "shards" else "folder"
        if key in results:
            continue
        results[key] = classify_mod.zero_shot(model, cfg, runtime.accelerator, tokenizer, data,
                                              templates=templates, templates_from=where or "config")
    return results

if __name__ == "__main__":
    sys.exit(main())
