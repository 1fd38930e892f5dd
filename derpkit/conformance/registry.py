"""Cases, their levels and results, and the one registry they are kept in.

A case is an async function taking a ``CaseContext``. It passes by returning (optionally a
one-line reason), and says anything else by raising ``Fail``, ``Skip`` or ``Info``. The
level decides what a failure means: a MUST failure is FAIL; a SHOULD failure is FAIL only
under ``--strict`` and INFO otherwise; an INFORMATIONAL case never fails (it reports what
the server chose where the spec leaves the choice to it).
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import CaseContext


class Level(enum.Enum):
    MUST = "MUST"
    SHOULD = "SHOULD"
    INFORMATIONAL = "INFORMATIONAL"


class Result(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    INFO = "INFO"


class Need(enum.Enum):
    """What a case needs beyond a DERP URL; without it the case is SKIP."""

    MESH_KEY = "mesh key"
    STUN = "STUN"
    TLS = "TLS"
    LONG = "--long"


#: Areas in the order reports list them.
AREAS = (
    "http", "upgrade", "fast-start", "websocket", "handshake", "framing", "relay",
    "peer-gone", "ping", "keepalive", "mesh", "tls", "stun",
)


class Verdict(Exception):
    """Raised by a case to end with something other than PASS."""

    result = Result.FAIL

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Fail(Verdict):
    result = Result.FAIL


class Skip(Verdict):
    result = Result.SKIP


class Info(Verdict):
    """An observation, not a judgement (INFORMATIONAL cases, server choices)."""

    result = Result.INFO


CaseFn = Callable[["CaseContext"], Awaitable[str | None]]


@dataclass(frozen=True)
class Case:
    id: str
    title: str
    level: Level
    section: str  # the spec section quoted, e.g. "derp-protocol §5.3"
    quote: str  # the requirement, in the spec's words (or close to them)
    fn: CaseFn = field(compare=False, repr=False)
    needs: frozenset[Need] = frozenset()
    timeout: float = 15.0

    @property
    def area(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def number(self) -> int:
        return int(self.id.split("/", 1)[1])


_REGISTRY: dict[str, Case] = {}
_ID_RE = re.compile(r"^([a-z-]+)/(\d+)$")


def case(
    id: str,  # noqa: A002 - the case id is the natural name here
    title: str,
    *,
    level: Level,
    section: str,
    quote: str,
    needs: Iterable[Need] = (),
    timeout: float = 15.0,
) -> Callable[[CaseFn], CaseFn]:
    """Register the decorated coroutine function as case ``id``."""
    m = _ID_RE.match(id)
    if m is None or m.group(1) not in AREAS:
        raise ValueError(f"bad case id {id!r}: want <area>/<number>, area one of {AREAS}")

    def register(fn: CaseFn) -> CaseFn:
        if id in _REGISTRY:
            raise ValueError(f"case {id} registered twice")
        _REGISTRY[id] = Case(id, title, level, section, quote, fn, frozenset(needs), timeout)
        return fn

    return register


def _load() -> None:
    from . import cases  # noqa: F401 - importing registers every case


def all_cases() -> list[Case]:
    """Every case, in report order (area, then number)."""
    _load()
    return sorted(_REGISTRY.values(), key=lambda c: (AREAS.index(c.area), c.number))


def _split(values: Iterable[str]) -> list[str]:
    return [g.strip() for v in values for g in v.split(",") if g.strip()]


def select(include: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[Case]:
    """Cases whose id matches any ``include`` glob (all when none) and no ``exclude`` glob.

    Each value may be a comma list (``relay/*,ping/1``), as ``--cases`` takes it on the
    command line and in the pytest plugin. A bare area name (``relay``) means the whole
    area, as ``relay/*`` does.
    """
    inc = [_glob(g) for g in _split(include)]
    exc = [_glob(g) for g in _split(exclude)]
    out = []
    for c in all_cases():
        if inc and not any(fnmatch.fnmatchcase(c.id, g) for g in inc):
            continue
        if any(fnmatch.fnmatchcase(c.id, g) for g in exc):
            continue
        out.append(c)
    return out


def _glob(g: str) -> str:
    g = g.strip()
    return g + "/*" if g in AREAS else g


@dataclass
class CaseResult:
    case: Case
    result: Result
    reason: str
    duration_s: float
    wire: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        c = self.case
        return {
            "id": c.id,
            "title": c.title,
            "level": c.level.value,
            "section": c.section,
            "quote": c.quote,
            "result": self.result.value,
            "reason": self.reason,
            "duration_s": round(self.duration_s, 4),
            "wire": self.wire,
        }
