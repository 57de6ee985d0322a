"""`mmpretrain train --config FILE [key=value ...]`, also run as
`accelerate launch --config_file launch/<mode>.yaml -m mmpretrain.train --config FILE ...`.

Every launch mode (one process, DDP, DeepSpeed ZeRO-2/3, multi-node) runs the same
``mmpretrain.trainer.loop.train``; see docs/training.md.
"""

from __future__ import annotations

import argparse
import sys


def fixed_choices() -> list[tuple[str, list]]:
    """``(dotted key, allowed values)`` of every ``Literal`` field of the config tree, read from
    the source of ``mmpretrain/config.py`` and the section modules it imports, without importing
    them (``mmpretrain.config`` loads torch through the model package, and ``--help`` stays
    instant). tests/unit/test_cli_help.py checks it against ``mmpretrain.config.literal_choices()``."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def parse(path: Path) -> tuple[dict, dict]:
        tree = ast.parse(path.read_text())
        imports = {a.asname or a.name: n.module for n in tree.body if isinstance(n, ast.ImportFrom)
                   and (n.module or "").startswith("mmpretrain.") for a in n.names}
        return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}, imports

    def walk(path: Path, name: str, prefix: str) -> list[tuple[str, list]]:
        classes, imports = parse(path)
        if name not in classes:
            return walk(root.joinpath(*imports[name].split(".")).with_suffix(".py"), name, prefix) \
                if name in imports else []
        out = []
        for node in classes[name].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            ann, key = node.annotation, prefix + node.target.id
            if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Literal":
                items = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
                out.append((key, [ast.literal_eval(item) for item in items]))
            elif isinstance(ann, ast.Name) and (ann.id in classes or ann.id in imports):
                out += walk(path, ann.id, key + ".")  # a section
        return out

    return walk(root / "mmpretrain" / "config.py", "Config", "")


def _epilog() -> str:
    choices = fixed_choices()
    width = max(len(key) for key, _ in choices) + 2
    lines = ["keys with a fixed set of values:"]
    lines += [f"  {key:<{width}}{' | '.join(str(v) for v in values)}" for key, values in choices]
    lines += ["", "Every key with its default, its allowed values and its documentation:",
              "  mmpretrain train --print-config   (add --config FILE and overrides to see their values)"]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mmpretrain train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from a YAML config with dotted overrides, e.g.\n"
                    "  mmpretrain train --config configs/tiny.yaml train.max_steps=50 optim.lr=1e-3",
        epilog=_epilog())
    parser.add_argument("--config", help="YAML config file (configs/*.yaml); required to train")
    parser.add_argument("--print-config", action="store_true",
                        help="print every config key with its value (from --config and the overrides, or the "
                             "defaults), its default, its allowed values and its documentation, as YAML, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides (a bare leaf such as max_steps=50 works where it names one key)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done (or stopped on request), 2 a start-up error (one line on stderr: a bad
    config value, data, launch or checkpoint), 3 too many non-finite steps. Errors raised inside
    the training loop keep their traceback."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    # after parsing: `--help` imports neither torch nor the model (mmpretrain.config does both)
    from mmpretrain.cli import quiet_third_party
    from mmpretrain.config import ConfigError, describe_config, load_config
    from mmpretrain.runtime import LaunchError, launch_info

    launch = launch_info()  # no runtime yet: what the launcher set
    quiet_third_party(single_process=launch.world_size <= 1)  # before accelerate/DeepSpeed load
    prefix = "mmpretrain train" + (f" [rank {launch.rank}]" if launch.world_size > 1 else "")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(describe_config(cfg))
            return 0
        if not args.config:
            raise ConfigError("--config is required (or --print-config to list every key)")
        from mmpretrain.trainer.loop import train

        return train(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from mmpretrain.trainer.checkpoint import CheckpointError
        from mmpretrain.trainer.loop import SetupError

        if isinstance(e, (LaunchError, CheckpointError, SetupError)):
            print(f"{prefix}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
