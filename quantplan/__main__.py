"""``python -m quantplan``: the same as the ``quantplan`` console script."""

import sys

from quantplan.cli import main

sys.exit(main())
