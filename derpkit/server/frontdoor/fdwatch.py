"""Say so, once, when the process runs out of file descriptors.

With every descriptor in use, the event loop cannot accept: libuv (uvloop) accepts and at
once closes each pending connection with a reserved descriptor, asyncio retries the
accept a second later. Either way the clients are refused and, without this module,
nothing is logged. The watch counts ``/proc/self/fd`` once a second against the soft
``RLIMIT_NOFILE`` and writes one warning when fewer than ``MARGIN`` are left, and one
line when connections are accepted again. Existing connections are not touched: they
keep their descriptors and keep flowing (tests/server/test_hostile.py).

It is started by the front door's first accepted connection on a loop (a timer handle,
no task), so every listener shares it and nothing needs to stop it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource

log = logging.getLogger("derpkit.server")

#: Descriptors left below which accepting is taken to be impossible (the loop keeps one in reserve).
MARGIN = 4
INTERVAL = 1.0


class FdWatch:
    """One per event loop; ``ensure(loop)`` arms it."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exhausted = False
        #: Episodes seen (for tests and /debug/vars readers).
        self.episodes = 0

    def ensure(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is loop:
            return
        self.loop = loop
        self.exhausted = False
        loop.call_later(INTERVAL, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is not loop or loop.is_closed():
            return
        try:
            used = len(os.listdir("/proc/self/fd"))
        except OSError:
            # No /proc, or no descriptor left to read it with: the latter is itself the sign.
            used = -1
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        full = used < 0 or (soft != resource.RLIM_INFINITY and used >= soft - MARGIN)
        if full and not self.exhausted:
            self.exhausted = True
            self.episodes += 1
            shown = "all" if used < 0 else f"{used} of {soft}"
            log.warning("out of file descriptors (%s in use, RLIMIT_NOFILE): new connections are refused "
                        "until some close; existing ones are unaffected", shown)
        elif not full and self.exhausted:
            self.exhausted = False
            log.info("file descriptors available again (%d of %d in use): accepting new connections", used, soft)
        loop.call_later(INTERVAL, self._tick, loop)


WATCH = FdWatch()
