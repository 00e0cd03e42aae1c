"""``python -m core`` is ``ctlab``."""

import sys

from core.cli import main

sys.exit(main())
