"""Real ``derpkit serve`` processes for the prober's module-scoped fixtures (synchronous, so any
fixture scope works), and running ``derpkit probe`` / Go ``derpprobe`` as an operator would."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_PORT_RE = re.compile(r"DERP on port (\d+)")
CERTNAME_RE = re.compile(r'"CertName":"(sha256-raw:[0-9a-f]{64})"')


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            assert self.proc.poll() is None, f"derpkit serve exited:\n{log[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in the log within {timeout} s:\n{log[-3000:]}"
            time.sleep(0.05)
        return log

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_serve(workdir: Path, *args: str, env: dict[str, str] | None = None) -> Serve:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "serve.log"
    full = {k: v for k, v in os.environ.items() if k != "HOSTNAME"}
    full.update(env or {})
    with open(log_path, "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "derpkit", "serve", "-c", str(workdir / "derper.key"), *args],
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=full)
    s = Serve(p, log_path)
    s.wait_for("DERP on port")
    return s


@dataclass
class Run:
    returncode: int
    output: str


def run_ours(*args: str, timeout: float = 60.0) -> Run:
    p = subprocess.run([sys.executable, "-m", "derpkit", "probe", *args], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(p.returncode, p.stderr + p.stdout)


def run_go(binary: str, *args: str, timeout: float = 60.0) -> Run:
    p = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(p.returncode, p.stderr + p.stdout)


def why(output: str, name: str) -> str:
    """The ``why:`` line printed under ``bad: <name>: …``."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if f"bad: {name}: " in line:
            for nxt in lines[i + 1:]:
                if nxt.startswith("    why: "):
                    return nxt[len("    why: "):]
                if "bad: " in nxt or "good: " in nxt:
                    break
    return ""
