"""``python -m bench --netns``: the whole run inside one fresh network namespace.

Some servers must not touch the host network (Hyper-DERP binds 0.0.0.0 and has no
address flag), so the bench re-executes itself under ``unshare --net`` (``unshare -rn``
when not root), brings ``lo`` up, and runs every server and generator in there. The
namespace has no name and nothing else in it: the kernel removes it when the bench's
last process exits, so nothing is left to clean up, even after a crash. Everything the
bench does runs on 127.0.0.0/8, which ``lo`` carries in the new namespace too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ENV = "DERPKIT_BENCH_NETNS"


def inside() -> bool:
    """True in the child the bench re-executed inside its namespace."""
    return os.environ.get(ENV) == "1"


def unshare_argv() -> list[str] | str:
    """The namespace-making command prefix, or why there is none."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None:
        return "--netns needs unshare(1) (util-linux)"
    if ip is None:
        return "--netns needs ip(8) (iproute2) to bring lo up"
    prefix = [unshare, "--net"] if os.geteuid() == 0 else [unshare, "-rn"]
    return [*prefix, "--", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"]


def run_inside(module_argv: list[str]) -> int:
    """Run ``python -m bench ARGS`` in a fresh namespace; its exit status (2 with a one-line
    reason if the namespace cannot be made)."""
    prefix = unshare_argv()
    if isinstance(prefix, str):
        print(f"bench: {prefix}", file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **{ENV: "1"})
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([*prefix, sys.executable, "-m", "bench", *module_argv], env=env)
    if p.returncode != 0 and p.returncode in (1, 255) and not inside():
        print(f"bench: --netns: the namespaced run exited with {p.returncode} "
              "(if unshare itself failed, its message is above)", file=sys.stderr)
    return p.returncode


def describe() -> str:
    """For the table header: where the run happened."""
    if not inside():
        return "host network namespace"
    try:
        ino = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return "a fresh network namespace"
    return f"a fresh network namespace (net:[{ino}], lo only)"
