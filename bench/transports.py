"""The transports ``python -m bench --transport`` measures, and the generator flags for each.

``http`` is the DERP upgrade over plain TCP (the bench's original rows); ``tls`` the same
over TLS 1.3 with the bench's test certificate; ``ws`` DERP over WebSocket (subprotocol
``derp``) on plain TCP and ``wss`` over TLS. The server side differs only in plain vs TLS:
both servers answer the DERP upgrade and the WebSocket upgrade on the same ``/derp``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tlscert import BenchTLS


@dataclass(frozen=True)
class Transport:
    name: str
    label: str
    tls: bool
    websocket: bool

    def generator_args(self, tls: BenchTLS | None) -> list[str]:
        """derpgen flags for this transport (the URL's scheme carries plain vs TLS)."""
        args: list[str] = []
        if self.tls:
            assert tls is not None
            args += ["-tls-ca", tls.ca_file, "-tls-name", tls.hostname]
        if self.websocket:
            args.append("-websocket")
        return args


TRANSPORTS: dict[str, Transport] = {
    t.name: t for t in (
        Transport("http", "plain HTTP (DERP upgrade)", False, False),
        Transport("tls", "TLS 1.3 (DERP upgrade, fast start)", True, False),
        Transport("ws", "WebSocket, plain", False, True),
        Transport("wss", "WebSocket over TLS 1.3", True, True),
    )
}


def parse_transports(spec: str) -> list[Transport]:
    """``http,tls,ws`` -> Transports, in order, without repeats; ValueError names a bad one."""
    out: list[Transport] = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        if name not in TRANSPORTS:
            raise ValueError(f"--transport: unknown transport {name!r} (choose from "
                             f"{', '.join(TRANSPORTS)})")
        if TRANSPORTS[name] not in out:
            out.append(TRANSPORTS[name])
    if not out:
        raise ValueError("--transport: no transport given")
    return out
