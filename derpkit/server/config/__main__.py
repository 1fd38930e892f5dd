"""``python3 -m derpkit.server.config --markdown``: print docs/flags.md (usage otherwise)."""

import sys

from .docs import main

sys.exit(main())
