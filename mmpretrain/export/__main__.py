"""``python -m mmpretrain.export`` = ``mmpretrain export``."""

import sys

from mmpretrain.export.cli import main

sys.exit(main())
