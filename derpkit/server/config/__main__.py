"""``python3 -m derpkit.server.config --markdown``: print docs/flags.md (usage otherwise)."""

import sys

from .config import main

sys.exit(main())
