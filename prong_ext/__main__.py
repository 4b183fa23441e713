"""``python -m prong_ext``: the experiments' command line (see prong_ext.cli)."""

import sys

from .cli import main

sys.exit(main())
