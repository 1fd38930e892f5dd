"""Run ``derpkit serve`` as a real subprocess, as an operator would, for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field

_PORT_RE = re.compile(r"DERP on port (\d+)")
_STUN_RE = re.compile(r"STUN server listening on \S+:(\d+)")


@dataclass
class ServeProc:
    proc: asyncio.subprocess.Process
    port: int
    stun_port: int | None
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    async def stop(self, sig: int = 15, timeout: float = 10.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout)


async def start_serve(*args: str, env: dict[str, str] | None = None, timeout: float = 20.0) -> ServeProc:
    """Start ``python -m derpkit serve ARGS`` and wait for its "DERP on port" line."""
    full_env = dict(os.environ)
    full_env.pop("HOSTNAME", None)
    if env:
        full_env.update(env)
    argv = list(args)
    has_key_file = any(a.lstrip("-") == "c" or a.lstrip("-").startswith("c=") for a in argv)
    if not has_key_file and "-dev" not in argv:
        argv = ["-c", os.path.join(tempfile.mkdtemp(prefix="derpkit-key-"), "derper.key"), *argv]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "derpkit", "serve", *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    port = None
    stun = None
    try:
        async with asyncio.timeout(timeout):
            while port is None:
                raw = await proc.stderr.readline()
                if not raw:
                    raise RuntimeError("derpkit serve exited early:\n" + "".join(lines))
                line = raw.decode(errors="replace")
                lines.append(line)
                if m := _STUN_RE.search(line):
                    stun = int(m.group(1))
                if m := _PORT_RE.search(line):
                    port = int(m.group(1))
    except BaseException:
        try:
            proc.kill()
        except ProcessLookupError:
            pass  # it already exited: that is usually what we are reporting
        await proc.wait()
        raise
    sp = ServeProc(proc, port, stun, lines)

    async def drain() -> None:
        assert proc.stderr is not None
        while raw := await proc.stderr.readline():
            sp.log.append(raw.decode(errors="replace"))

    asyncio.get_running_loop().create_task(drain())
    return sp
