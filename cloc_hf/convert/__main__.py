"""``python -m cloc_hf.convert``: the ``cloc-convert`` command line."""

import sys

from .cli import main

sys.exit(main())
