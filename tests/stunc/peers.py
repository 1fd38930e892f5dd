"""Port choice and readiness polling for the STUN servers the stunc tests start."""

from __future__ import annotations

import random
import socket
import time

A1, A2 = "127.0.0.1", "127.0.0.2"


def free_pair() -> int:
    """A port P with P and P+1 free for UDP and TCP on both loopback IPs (bounded tries).

    Taken below the kernel's ephemeral range: coturn also binds TCP on its ports without
    SO_REUSEADDR and retries for ever while a TIME-WAIT connection of some other test holds
    one of them, which ephemeral ports often are.
    """
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        socks = []
        try:
            for ip in (A1, A2):
                for p in (port, port + 1):
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        t = socket.socket(socket.AF_INET, kind)
                        socks.append(t)
                        t.bind((ip, p))
            return port
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise AssertionError("no free port pair")


def wait_answering(port: int, deadline: float = 15.0) -> None:
    """Poll with a plain request until the server answers (paced, bounded)."""
    from derpkit.stun import build_plain_request

    end = time.monotonic() + deadline
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < end:
            try:
                s.sendto(build_plain_request(), (A1, port))
                s.recvfrom(2048)
                return
            except OSError:  # timeout or ICMP refusal: not listening yet
                time.sleep(0.05)
    raise AssertionError(f"no STUN server answered on {A1}:{port} within {deadline:g} s")
