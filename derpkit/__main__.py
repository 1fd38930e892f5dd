"""``python -m derpkit`` is the same as the ``derpkit`` command."""

import sys

from derpkit.cli import main

sys.exit(main())
