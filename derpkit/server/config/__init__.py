"""``derpkit serve``'s settings, one module per job.

* settings.py: the one table (flag, env names, kind, default, check, help) and its indexes;
* serveconfig.py: :class:`ServeConfig`, the resolved values, and their origins;
* parse.py: :func:`parse_config` (Go ``flag`` command line, then env, then defaults);
* validate.py: derper's start-up refusals that need no I/O;
* docs.py: the usage text and ``docs/flags.md``;
* knobs.py: derper's non-flag environment knobs (``TS_DEBUG_*`` and friends);
* errors.py: :class:`ConfigError` and its exit statuses.

Callers import from here (``from derpkit.server.config import parse_config``), never from
the modules inside, so the split can change without touching them.
"""

from .docs import flags_markdown, usage
from .errors import ConfigError, HelpRequested
from .knobs import Knobs
from .parse import parse_config
from .serveconfig import ServeConfig
from .settings import SETTINGS, Setting
from .validate import cert_refusal, validate_config

__all__ = [
    "SETTINGS",
    "ConfigError",
    "HelpRequested",
    "Knobs",
    "ServeConfig",
    "Setting",
    "cert_refusal",
    "flags_markdown",
    "parse_config",
    "usage",
    "validate_config",
]
