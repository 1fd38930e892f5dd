"""The command line, then the environment, then derper's defaults: :func:`parse_config`.

The command line follows Go's ``flag`` rules (``derpkit.gosyntax.scan_flags``); every
environment variable named in the table is read here, once, at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from derpkit.gosyntax import (
    FlagError,
    FlagHelp,
    GoValueError,
    flag_value_error,
    go_quote,
    scan_flags,
)

from .docs import usage
from .errors import ConfigError, HelpRequested
from .knobs import Knobs
from .serveconfig import ServeConfig
from .settings import BY_FLAG, SETTINGS, PathExists, Setting
from .validate import validate_config


def _parse_argv(
    argv: Sequence[str], environ: Mapping[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """Go ``flag`` rules: returns {attr: value} for flags given, and the ignored leftovers."""

    def is_bool(name: str) -> bool | None:
        setting = BY_FLAG.get(name)
        return None if setting is None else setting.kind == "bool"

    given: dict[str, Any] = {}
    rest: list[str] = []
    try:
        for name, text, bool_flag in scan_flags(argv, is_bool, rest):
            setting = BY_FLAG[name]
            try:
                given[setting.attr] = setting.parse(text)
            except GoValueError as e:
                raise flag_value_error(name, text, e.reason, is_bool=bool_flag) from None
    except FlagHelp:
        raise HelpRequested(usage(environ)) from None
    except FlagError as e:
        raise ConfigError(e.message, usage=usage(environ), flag=e.flag) from None
    return given, rest


def _apply_env(
    values: dict[str, Any],
    given: Mapping[str, Any],
    environ: Mapping[str, str],
    origins: dict[str, str],
) -> list[str]:
    """Fill settings not given on the command line from the environment; return log notes."""
    notes: list[str] = []
    for setting in SETTINGS:
        present = [name for name in setting.all_envs if name in environ]
        if not present:
            continue
        if setting.attr in given:
            for name in present:
                notes.append(
                    f"env {name}={_shown(setting, environ[name])} ignored: "
                    f"-{setting.flag} given on the command line"
                )
            continue
        name = present[0]
        text = environ[name]
        try:
            values[setting.attr] = setting.parse(text)
        except GoValueError as e:
            raise ConfigError(
                f"derpkit: invalid value {go_quote(_shown(setting, text))} for "
                f"-{setting.flag} (from env {name}): {e.reason}",
                flag=setting.flag,
                env=name,
            ) from None
        origins[setting.attr] = f"env {name}"
        notes.append(f"env {name}={_shown(setting, text)} -> -{setting.flag}")
        for other in present[1:]:
            notes.append(f"env {other}={_shown(setting, environ[other])} ignored: {name} is set")
    return notes


def _shown(setting: Setting, text: str) -> str:
    """A value as it may appear in logs: secrets are masked."""
    return "<redacted>" if setting.secret and text else text


def parse_config(
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    path_exists: PathExists = os.path.exists,
) -> tuple[ServeConfig, list[str]]:
    """Command line, then environment, then derper's defaults → a validated :class:`ServeConfig`.

    Returns the config and log notes (one per env var applied or shadowed, plus warnings) for
    the caller to log at start-up: a stray ``HOSTNAME`` outside Docker silently changes
    ``-hostname``, and the log line is how an operator finds out.

    With ``-version`` the shape checks are skipped, as derper prints its version before any
    other work. ``path_exists`` is for tests of the mesh-key-file default.
    """
    given, leftovers = _parse_argv(argv, environ)
    values = {s.attr: s.default_value(environ, path_exists) for s in SETTINGS}
    values.update(given)
    origins = {attr: "flag" for attr in given}
    notes = _apply_env(values, given, environ, origins)
    if leftovers:
        notes.append(
            f"warning: ignoring arguments from {go_quote(leftovers[0])} on: flags stop at the "
            f"first non-flag (a bool is switched off with -name=false, not -name false)"
        )
    cfg = ServeConfig(**values, origins=origins, knobs=Knobs.from_environ(environ))
    if not cfg.version:
        notes.extend(validate_config(cfg))
    return cfg, notes
