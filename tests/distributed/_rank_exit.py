"""A rank as torchrun sees it, with its exit status recorded: ``python _rank_exit.py ARGS`` runs
``python -m mmpretrain.train ARGS`` as a child and writes ``{"rank", "returncode"}`` to
``$MMPRETRAIN_RANK_EXIT_DIR/rank_<RANK>.json`` when it ends, then exits with the same status.

torchrun reports nothing about its workers' exit statuses after it was signalled itself; this
is how a test proves that every rank exited 0. The wrapper changes nothing the rank sees: it is
the session leader torchrun signals with ``killpg`` (``start_new_session``), and the rank and
its DataLoader workers are in that process group, so they get the same signal as without it.
The wrapper itself only waits (its own handlers are Python no-ops; the rank starts with the
default dispositions, since handlers do not survive ``exec``). A rank killed with SIGKILL
(torchrun's 30-second limit) kills the wrapper too: no file, which the test reports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def main() -> int:
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        signal.signal(getattr(signal, name), lambda *_: None)
    proc = subprocess.Popen([sys.executable, "-m", "mmpretrain.train", *sys.argv[1:]])
    code = proc.wait()
    out = Path(os.environ["MMPRETRAIN_RANK_EXIT_DIR"]) / f"rank_{os.environ['RANK']}.json"
    out.write_text(json.dumps({"rank": int(os.environ["RANK"]), "returncode": code}))
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    raise SystemExit(main())
