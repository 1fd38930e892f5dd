"""Replace a file in one step, so a crash never leaves a half-written key or certificate.

The server key (``-c``), generated and ACME certificates and the setec cache are all read
back at the next start; a torn write there would stop the relay from starting, or change
its identity. Go's derper writes each of them beside the target and renames over it; so
do we, with the mode set before any byte is written.
"""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
