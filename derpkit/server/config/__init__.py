"""``derpkit serve``'s settings: the flag/env table, parsing, validation and docs/flags.md.

Callers import from here (``from derpkit.server.config import parse_config``) so the
modules inside can be split by job without touching them.
"""

from .config import (
    SETTINGS,
    ConfigError,
    HelpRequested,
    ServeConfig,
    Setting,
    cert_refusal,
    flags_markdown,
    parse_config,
    usage,
    validate_config,
)

__all__ = [
    "SETTINGS",
    "ConfigError",
    "HelpRequested",
    "ServeConfig",
    "Setting",
    "cert_refusal",
    "flags_markdown",
    "parse_config",
    "usage",
    "validate_config",
]
