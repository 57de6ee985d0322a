"""`mmpretrain` command: a thin dispatcher to each sub-command's own ``main(argv)``.

Every sub-command module exposes ``main(argv: list[str] | None) -> int`` so tests call it
exactly as the command line does.
"""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    "shards": ("mmpretrain.data.cli", "make, build and inspect WebDataset shards"),
    "train": ("mmpretrain.train", "train from a YAML config (also under `accelerate launch`)"),
    "eval": ("mmpretrain.evaluation.cli", "zero-shot retrieval + ITM re-ranking of a checkpoint"),
    "export": ("mmpretrain.export.cli", "export a checkpoint to safetensors / transformers / timm"),
    "bench": ("mmpretrain.bench", "benchmarks: loader throughput, model step time, learning quality"),
    "pipeline": ("mmpretrain.pipeline", "the whole job on the embedded default: shards -> train -> eval -> export"),
}


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with one of ``starts``; keeps every other."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_QUIETED: set[str] = set()


def quiet_third_party(single_process: bool) -> None:
    """Silence third-party notices that do not apply to our commands, before their modules load
    (a filter on the named logger; the rest of each logger's messages still print):

    * torch's ``No CUDA runtime is found, using CUDA_HOME=...`` (``torch.utils.cpp_extension``,
      logged only when torch sees no CUDA device): nothing here compiles CUDA code then;
      DeepSpeed's CPU ops need only a C++ compiler.
    * DeepSpeed's ``Setting accelerator to CPU ...`` when ``single_process`` (eval, export and
      pipeline here; train when ``mmpretrain.runtime.launch_info`` says one process): there
      DeepSpeed never runs an engine, it is only imported (by accelerate, or to read a ZeRO
      checkpoint), and the start-up line names the device. Under a launcher, DeepSpeed runs and
      its notice stays.
    Nothing else changes: no environment variable is set, DeepSpeed picks its accelerator as before.
    """
    if "cuda_home" not in _QUIETED:
        logging.getLogger("torch.utils.cpp_extension").addFilter(_DropMessages("No CUDA runtime is found"))
        _QUIETED.add("cuda_home")
    if single_process and "ds_cpu" not in _QUIETED:
        logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))
        _QUIETED.add("ds_cpu")


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
    if name in ("eval", "export", "pipeline"):  # one process; train decides in its own main()
        quiet_third_party(single_process=True)
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
