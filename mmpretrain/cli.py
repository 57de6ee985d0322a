"""`mmpretrain` command: a thin dispatcher to each sub-command's own ``main(argv)``.

Every sub-command module exposes ``main(argv: list[str] | None) -> int`` so tests call it
exactly as the command line does.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "shards": ("mmpretrain.data.cli", "make, build and inspect WebDataset shards"),
    "train": ("mmpretrain.train", "train from a YAML config (also under `accelerate launch`)"),
    "eval": ("mmpretrain.evaluation.cli", "zero-shot retrieval + ITM re-ranking of a checkpoint"),
    "export": ("mmpretrain.export.cli", "export a checkpoint to safetensors / transformers / timm"),
    "bench": ("mmpretrain.bench", "benchmarks: loader throughput, model step time, learning quality"),
    "pipeline": ("mmpretrain.pipeline", "the whole job on the embedded default: shards -> train -> eval -> export"),
}


def usage() -> str:
    lines = ["usage: mmpretrain <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `mmpretrain <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"mmpretrain: unknown command '{name}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
