"""``python -m sensilora ...``: the same command line as the ``sensilora`` script."""

import sys

from .cli import main

sys.exit(main())
