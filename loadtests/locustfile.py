"""DERP relay load test: ``locust -f loadtests/locustfile.py --host http://127.0.0.1:3340``.

User classes (pick some by name, or all by default): PacketPair, Pinger, Churner, Idler,
MeshSender (needs ``--derp-mesh-host``). Options are under "DERP" in ``locust --help``;
docs/benchmarks.md has worked examples for headless, web UI and distributed runs.
"""

import os
import sys

# locust puts this file's directory on sys.path; the package lives one level up.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from loadtests.users import (  # noqa: E402
    Churner,
    Idler,
    MeshSender,
    PacketPair,
    Pinger,
)

__all__ = ["Churner", "Idler", "MeshSender", "PacketPair", "Pinger"]
