"""`--help` of every sub-command: parsed before torch is imported, every option with its default."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

HELP_COMMANDS = [["train"], ["eval"], ["pipeline"], ["shards"], ["shards", "synthetic"], ["shards", "build"],
                 ["shards", "stats"], ["bench"], ["bench", "loader"]]


def test_help_does_not_import_torch():
    """One interpreter runs every `--help` (as `python -m mmpretrain CMD --help` does) and checks
    that torch never got imported: help is instant and works without a working torch."""
    code = (
        "import sys, contextlib, io\n"
        "from mmpretrain.cli import main\n"
        f"for cmd in {HELP_COMMANDS!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            rc = main(cmd + ['--help'])\n"
        "        except SystemExit as e:\n"
        "            rc = e.code\n"
        "    assert rc in (0, None), (cmd, rc)\n"
        "    assert 'usage' in out.getvalue().lower(), cmd\n"
        "    assert 'torch' not in sys.modules, f'{cmd} --help imported torch'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _options(help_text: str) -> dict[str, str]:
    """Option name -> its help text, from argparse's formatted help."""
    body = help_text.split("options:", 1)[1]
    opts: dict[str, str] = {}
    current = None
    for line in body.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            opts[current] = line
        elif current and line.startswith("    "):
            opts[current] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in opts.items() if k not in ("-h", "--help")}


@pytest.mark.parametrize("module,argv", [("mmpretrain.data.stats", []), ("mmpretrain.data.bench", []),
                                         ("mmpretrain.pipeline", []), ("mmpretrain.data.cli", ["build"]),
                                         ("mmpretrain.data.cli", ["synthetic"])])
def test_every_option_names_its_default(module, argv, capsys):
    import importlib

    prog = module
    rc = importlib.import_module(module).main(argv + ["--help"]) if argv else None
    if not argv:
        with pytest.raises(SystemExit):
            importlib.import_module(module).main(["--help"])
    assert rc in (None, 0)
    opts = _options(capsys.readouterr().out)
    assert opts, prog
    for name, text in opts.items():
        assert "(default:" in text or "default: " in text or "required" in text, f"{prog} {name}: {text}"


def test_third_party_notices_that_do_not_apply_are_silenced_and_nothing_else():
    """`quiet_third_party()` (called by the `mmpretrain` dispatcher and the trainer before their
    imports) drops torch's CUDA_HOME notice and, in one process, DeepSpeed's 'Setting accelerator
    to CPU'; DeepSpeed's other messages and its accelerator choice are unchanged."""
    code = (
        "import os\n"
        "from mmpretrain.cli import quiet_third_party\n"
        "before = os.environ.copy()\n"
        "quiet_third_party(single_process=True)\n"
        "assert os.environ == before\n"
        "import torch.utils.cpp_extension as ext\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "from deepspeed.utils import logger\n"
        "import torch\n"
        "name = get_accelerator().device_name()\n"
        "assert name == ('cuda' if torch.cuda.is_available() else 'cpu'), name\n"
        "logger.warning('another DeepSpeed warning')\n"
        "ext.logger.warning('another cpp_extension warning')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("WORLD_SIZE", "DS_ACCELERATOR")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Setting accelerator to CPU" not in out and "No CUDA runtime is found" not in out, out
    assert "another DeepSpeed warning" in out and "another cpp_extension warning" in out


def test_deepspeeds_cpu_notice_stays_under_a_launcher(monkeypatch):
    import logging

    from mmpretrain import cli

    monkeypatch.setattr(cli, "_QUIETED", set())
    ds, ext = logging.getLogger("DeepSpeed"), logging.getLogger("torch.utils.cpp_extension")
    before, ext_before = list(ds.filters), list(ext.filters)
    try:
        cli.quiet_third_party(single_process=False)
        assert ds.filters == before  # several processes: DeepSpeed runs, its notice is kept
        assert len(ext.filters) == len(ext_before) + 1
    finally:
        ext.filters[:] = ext_before


def test_train_help_lists_the_fixed_choices_and_ends_at_print_config(capsys):
    """`mmpretrain train --help` reads the ``Literal`` fields from the config source (no import:
    the test above checks it stays torch-free); they must be exactly the typed tree's."""
    from mmpretrain import train
    from mmpretrain.config import literal_choices

    assert {key: tuple(values) for key, values in train.fixed_choices()} == literal_choices()
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for key, values in literal_choices().items():
        assert re.search(rf"^  {re.escape(key)} +{re.escape(' | '.join(values))}$", text, re.M), key
    assert text.rstrip().splitlines()[-1].strip().startswith("mmpretrain train --print-config")
