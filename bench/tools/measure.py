"""Run one tool as a child process and take what the kernel knows about it.

CPU seconds come from ``wait4``'s rusage of that one child (user+system of all its threads,
so a Go program's threads are all counted); peak RSS from its ``VmHWM``. ``taskset`` execs
the tool in the same process, so a pinned tool is still the child being measured.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ToolRun:
    """What one run of a tool cost and said."""

    argv: list[str]
    returncode: int
    wall_s: float
    cpu_s: float
    max_rss: int  # bytes
    stdout: str
    stderr: str
    timed_out: bool = False

    def tail(self, n: int = 1500) -> str:
        """The end of its output, for a one-line failure message."""
        return (self.stderr + self.stdout)[-n:].strip()


def run_tool(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 120.0,
             cwd: str | None = None) -> ToolRun:
    """Run ``argv`` to the end; its wall time, CPU seconds and peak RSS.

    CPU seconds are ``wait4``'s rusage of the child. Peak RSS is the child's ``VmHWM``
    (/proc/PID/status), read every 20 ms while it runs: ``ru_maxrss`` cannot be used, because
    Linux carries the high-water mark of the pre-exec image across ``execve`` — a child forked
    from this Python process would report at least this process's RSS. Output goes to
    temporary files (no pipe can fill and stall the tool). On ``timeout`` the child's process
    group is killed and the run is marked ``timed_out``.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                             cwd=cwd, start_new_session=True)
        hwm, timed_out = 0, False
        while True:
            time.sleep(0.02)
            hwm = max(hwm, vm_hwm(p.pid))
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout and not timed_out:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return ToolRun(argv, p.returncode, wall, ru.ru_utime + ru.ru_stime, hwm,
                       out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                       timed_out)


def vm_hwm(pid: int) -> int:
    """Peak resident set of ``pid``'s current image in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class Figure:
    """One figure over its rounds: median and spread, plus what it is and what it means."""

    key: str
    label: str
    unit: str
    values: list[float]
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def low(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def high(self) -> float | None:
        return max(self.values) if self.values else None

    @property
    def spread_pct(self) -> float | None:
        """(max − min) / median, in per cent: how far the rounds disagree."""
        m = self.median
        if not self.values or not m:
            return None
        return (max(self.values) - min(self.values)) / abs(m) * 100

    def as_json(self) -> dict[str, object]:
        return {"label": self.label, "unit": self.unit, "rounds": self.values, "median": self.median,
                "min": self.low, "max": self.high, "spread_pct": self.spread_pct, "note": self.note}


def repo_root() -> Path:
    """The checkout this bench runs from (children get it on PYTHONPATH)."""
    return Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a Python child: this checkout first on PYTHONPATH, no HOSTNAME
    (derpkit serve reads it as -hostname), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "HOSTNAME"}
    root = str(repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env
