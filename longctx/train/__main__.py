"""``python -m longctx.train``: the same as ``longctx train`` (see :mod:`longctx.train.cli`)."""

import sys

from .cli import main

sys.exit(main())
