"""`mmpretrain bench <what>`: benchmark scripts that print numbers (never timed tests).

  loader   samples/s per worker of the full loader vs a plain decode+resize loop
  model    forward+backward time per sample, share spent in gathers and ITM mining
  quality  train the default for a budget, print held-out recall, ITM and compositional scores
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "loader": "mmpretrain.data.bench",
    "model": "mmpretrain.models.bench",
    "quality": "mmpretrain.quality",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print("usage: mmpretrain bench {" + ",".join(BENCHES) + "} [options]  (`mmpretrain bench loader --help`: "
              "the options of one)\n\n" + __doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0)
