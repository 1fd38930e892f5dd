"""A blocking DERP client over ``derpkit.protocol``, for locust's gevent world.

Plain ``socket`` and ``ssl`` calls, looked up at call time, so that once gevent has
monkey-patched them (locust does so on import) every wait yields to other greenlets.
Everything DERP-specific is the sans-IO core: ``upgrade.build_request`` /
``split_head`` / ``parse_response_head`` for the HTTP upgrade, ``FrameReader`` and the
frame decoders, ``handshake`` for the sealed ClientInfo/ServerInfo. This module adds only
reads, writes and timeouts.

One client serves one greenlet at a time for reading; ``send`` may be called from another
greenlet (a sender and a receiver loop sharing a connection), since gevent sockets allow
one reader and one writer concurrently.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections import deque

from derpkit.client.conn import parse_url
from derpkit.client.errors import DerpError
from derpkit.client.tls import check_pin, plan_tls
from derpkit.protocol import handshake
from derpkit.protocol.constants import KEY_LEN, PING_DATA_LEN, FrameType
from derpkit.protocol.errors import ProtocolError
from derpkit.protocol.frames import (
    Frame,
    FrameReader,
    Ping,
    Pong,
    RecvPacket,
    ServerInfoFrame,
    Unknown,
    decode_client_side,
    decode_server_key,
    encode_send_packet,
    frame,
)
from derpkit.protocol.keys import MeshKey, NodePrivate, NodePublic
from derpkit.protocol.upgrade import build_request, parse_response_head, split_head

__all__ = ["BlockingDerpClient", "DerpLoadError"]

_T_RECV = int(FrameType.RECV_PACKET)
_T_SERVER_INFO = int(FrameType.SERVER_INFO)


class DerpLoadError(Exception):
    """Connecting, the handshake or a read/write failed; the message says which.

    The one error type the locust users catch: any failure of the network, TLS (including a
    CertName pin mismatch), the DERP handshake or a malformed option surfaces as this, so it
    is counted as a failed request rather than killing the user.
    """


class BlockingDerpClient:
    """One DERP connection; create it with ``BlockingDerpClient.connect(url, ...)``."""

    def __init__(self, sock: socket.socket, private_key: NodePrivate, url: str) -> None:
        self.sock = sock
        self.url = url
        self.private_key = private_key
        self.public_key: NodePublic = private_key.public()
        self.public_raw = self.public_key.raw
        self.server_key: NodePublic | None = None
        self.server_info: handshake.ServerInfo | None = None
        self._reader = FrameReader()
        self._frames: deque[tuple[int, bytes]] = deque()
        self.closed = False

    # ------------------------------------------------------------------ connecting

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        private_key: NodePrivate | None = None,
        mesh_key: MeshKey | None = None,
        cert_name: str | None = None,
        insecure_tls: bool = False,
        timeout: float = 10.0,
        can_ack_pings: bool = True,
        app_name: str = "derpkit-locust",
        source_address: tuple[str, int] | None = None,
        wait_for_server_info: bool = True,
    ) -> BlockingDerpClient:
        """TCP (+TLS) connect, HTTP upgrade, ServerKey, ClientInfo and ServerInfo.

        ``url`` is ``http://``, ``https://`` or ``derp://`` (= https); the path defaults to
        /derp. ``cert_name`` is a DERP-map CertName: a ``sha256-raw:`` pin or a TLS name.
        """
        u = parse_url(url)
        priv = private_key or NodePrivate.generate()
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((u.host, u.port), timeout, source_address)
        except OSError as e:
            raise DerpLoadError(f"connect to {url}: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if u.tls:
                plan = plan_tls(u.host, cert_name=cert_name, insecure=insecure_tls)
                sock = plan.context.wrap_socket(sock, server_hostname=plan.server_name)
                if plan.pin_sha256 is not None:
                    check_pin(sock.getpeercert(binary_form=True), plan.pin_sha256, url)
            self = cls(sock, priv, url)
            self._handshake(u.host_header, u.path, mesh_key, can_ack_pings, app_name,
                            wait_for_server_info, deadline)
        except BaseException as e:
            sock.close()
            if isinstance(e, DerpLoadError):
                raise
            # DerpError: the shared TLS helpers raise DerpCertificateError on a CertName pin
            # mismatch. Everything that stops this one connection becomes a DerpLoadError,
            # so the locust user reports a failed request instead of dying in on_start.
            if isinstance(e, ssl.SSLError | OSError | ProtocolError | ValueError | DerpError):
                raise DerpLoadError(f"connect to {url}: {e}") from e
            raise
        sock.settimeout(None)
        return self

    def _recv_some(self, deadline: float | None) -> bytes:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
        data = self.sock.recv(256 << 10)
        if not data:
            raise DerpLoadError(f"{self.url}: server closed the connection")
        return data

    def _handshake(
        self,
        host_header: str,
        path: str,
        mesh_key: MeshKey | None,
        can_ack_pings: bool,
        app_name: str,
        wait_for_server_info: bool,
        deadline: float,
    ) -> None:
        stage = "HTTP upgrade"
        try:
            self.sock.sendall(build_request(host_header, path))
            buf = b""
            while (parts := split_head(buf)) is None:
                buf += self._recv_some(deadline)
            head, rest = parts
            resp = parse_response_head(head)
            if resp.status != 101:
                raise DerpLoadError(
                    f"{self.url}: upgrade refused: HTTP {resp.status} {resp.reason}: "
                    f"{rest[:200].decode('utf-8', 'replace').strip()}"
                )
            stage = "ServerKey"
            self._frames.extend(self._reader.feed(rest))
            while not self._frames:
                self._frames.extend(self._reader.feed(self._recv_some(deadline)))
            ftype, payload = self._frames.popleft()
            self.server_key = NodePublic(decode_server_key(ftype, payload).key)
            info = handshake.ClientInfo(
                mesh_key=mesh_key, can_ack_pings=can_ack_pings, app_name=app_name
            )
            self.sock.sendall(handshake.client_info_frame(self.private_key, self.server_key, info))
            if not wait_for_server_info:
                return
            stage = "ServerInfo (admission)"
            held: deque[tuple[int, bytes]] = deque()
            while True:
                while not self._frames:
                    self._frames.extend(self._reader.feed(self._recv_some(deadline)))
                ftype, payload = self._frames.popleft()
                if ftype == _T_SERVER_INFO:
                    self.server_info = handshake.open_server_info(
                        self.private_key, self.server_key, payload
                    )
                    # Frames that came ahead of ServerInfo (a Ping, say) stay for recv().
                    held.extend(self._frames)
                    self._frames = held
                    return
                held.append((ftype, payload))
                if len(held) > 1024:
                    raise DerpLoadError(f"{self.url}: no ServerInfo among 1024 frames")
        except TimeoutError:
            raise DerpLoadError(f"connect to {self.url}: timed out waiting for {stage}") from None

    # ------------------------------------------------------------------ traffic

    def send(self, dst: bytes | NodePublic, data: bytes) -> int:
        """Write one SendPacket frame; returns the bytes written."""
        raw = dst.raw if isinstance(dst, NodePublic) else dst
        if len(raw) != KEY_LEN:
            raise ValueError(f"destination key must be {KEY_LEN} bytes")
        out = encode_send_packet(raw, data)
        try:
            self.sock.sendall(out)
        except OSError as e:
            self.closed = True
            raise DerpLoadError(f"{self.url}: send: {e}") from e
        return len(out)

    def send_ping(self, data: bytes) -> None:
        try:
            self.sock.sendall(frame(FrameType.PING, data))
        except OSError as e:
            self.closed = True
            raise DerpLoadError(f"{self.url}: send ping: {e}") from e

    def recv(self, timeout: float | None = None) -> Frame:
        """The next frame the server sent (RecvPacket, Pong, Ping, KeepAlive, PeerGone...).

        Server Pings are answered with a Pong automatically (and still returned). Raises
        ``TimeoutError`` after ``timeout`` seconds without a frame, ``DerpLoadError`` when
        the connection is gone.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        frames = self._frames
        while True:
            while frames:
                ftype, payload = frames.popleft()
                if ftype == _T_RECV and len(payload) >= KEY_LEN:
                    return RecvPacket(payload[:KEY_LEN], payload[KEY_LEN:])
                f = decode_client_side(ftype, payload)
                if f is None or isinstance(f, Unknown | ServerInfoFrame):
                    continue
                if isinstance(f, Ping):
                    try:
                        self.sock.sendall(Pong(f.data).encode())
                    except OSError:
                        pass
                return f
            try:
                data = self._recv_some(deadline)
            except TimeoutError:
                raise
            except OSError as e:
                self.closed = True
                raise DerpLoadError(f"{self.url}: receive: {e}") from e
            except DerpLoadError:
                self.closed = True
                raise
            try:
                frames.extend(self._reader.feed(data))
            except ProtocolError as e:
                frames.extend(getattr(e, "frames", []))
                self.closed = True
                if not frames:
                    raise DerpLoadError(f"{self.url}: {e}") from e

    def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time (seconds) of a Ping.

        Frames other than our Pong that arrive meanwhile are discarded: use this on
        connections nobody else reads (Pinger, Idler), not on a packet receiver.
        """
        data = os.urandom(PING_DATA_LEN)
        start = time.perf_counter()
        self.send_ping(data)
        deadline = time.monotonic() + timeout
        while True:
            f = self.recv(max(0.0, deadline - time.monotonic()))
            if isinstance(f, Pong) and f.data == data:
                return time.perf_counter() - start

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

