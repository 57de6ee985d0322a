"""`mmpretrain train --config FILE [key=value ...]`, also run as
`accelerate launch --config_file launch/<mode>.yaml -m mmpretrain.train --config FILE ...`.

Every launch mode (one process, DDP, DeepSpeed ZeRO-2/3, multi-node) runs the same
``mmpretrain.trainer.loop.train``; see docs/training.md.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mmpretrain train",
        description="Train from a YAML config with dotted overrides, e.g. "
                    "`mmpretrain train --config configs/tiny.yaml train.max_steps=50 optim.lr=1e-3`.")
    parser.add_argument("--config", help="YAML config file (configs/*.yaml); required unless --print-config")
    parser.add_argument("--print-config", action="store_true",
                        help="print every config key with its value (from --config and the overrides, or the "
                             "defaults), its default and its documentation, as YAML, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
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
