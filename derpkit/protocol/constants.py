"""Every DERP wire constant in one place.

Values are facts of the protocol that Tailscale's Go clients and ``derper`` rely on; each
line says what depends on it. Nothing here may change without breaking wire compatibility.
"""

from __future__ import annotations

import enum

#: Eight bytes "DERP" + U+1F511 (key emoji) at the start of the ServerKey payload.
MAGIC = b"DERP\xf0\x9f\x94\x91"
#: Version we speak and advertise. v1 lacked the source key in RecvPacket.
PROTOCOL_VERSION = 2
#: One type byte and a big-endian uint32 payload length.
FRAME_HEADER_LEN = 5
#: Raw Curve25519 public key length; every address on the wire is this long.
KEY_LEN = 32
#: NaCl box nonce length.
NONCE_LEN = 24
#: Poly1305 tag NaCl box adds to every sealed message.
BOX_OVERHEAD = 16
#: Largest packet payload a client may send or receive (not counting key or header).
MAX_PACKET_SIZE = 64 << 10
#: Largest JSON info blob the client accepts; also the cap on any frame a client reads.
MAX_INFO_LEN = 1 << 20
#: Largest frame a client reads after the handshake.
MAX_CLIENT_RECV_FRAME = MAX_INFO_LEN
#: Shortest legal ClientInfo frame: key + nonce (an empty box still has 16 bytes, but Go
#: checks only key + nonce before opening).
MIN_CLIENT_INFO_LEN = KEY_LEN + NONCE_LEN
#: Longest ClientInfo frame the server reads.
MAX_CLIENT_INFO_LEN = 256 << 10
#: ServerKey payload: magic + key; clients accept up to 1 KiB and ignore the rest.
SERVER_KEY_LEN = len(MAGIC) + KEY_LEN
MAX_SERVER_KEY_LEN = 1024
#: Ping payload bounds the server enforces (8 data bytes, extra ignored up to 1000).
PING_DATA_LEN = 8
MAX_PING_LEN = 1000
#: Sanity cap Go applies to any frame it writes.
MAX_WRITE_FRAME = 10 << 20

#: Server keepalive period; each connection adds a jitter in [0, KEEPALIVE_JITTER).
KEEPALIVE_INTERVAL = 60.0
KEEPALIVE_JITTER = 5.0
#: Go clients give up after this long without any frame (two missed keepalives).
CLIENT_READ_TIMEOUT = 120.0
#: Handshake deadline: 10 s to write ServerKey, then a fresh 10 s to receive ClientInfo.
HANDSHAKE_TIMEOUT = 10.0
#: Per-frame write deadline for regular clients (derper -tcp-write-timeout) and mesh peers.
DEFAULT_WRITE_TIMEOUT = 2.0
MESH_WRITE_TIMEOUT = 30.0
#: One connect attempt (TCP + TLS + HTTP + DERP handshake) in the Go client.
CLIENT_CONNECT_TIMEOUT = 10.0
#: Mesh watch loop retry interval.
MESH_RETRY_INTERVAL = 5.0
#: Client Ping helper waits this long for its Pong.
PING_TIMEOUT = 5.0

#: Per-connection queue capacity (disco and regular queues each), env override below.
PER_CLIENT_SEND_QUEUE_DEPTH = 32
SEND_QUEUE_DEPTH_ENV = "TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH"
#: Enqueue attempts before the new packet itself is tail-dropped.
ENQUEUE_ATTEMPTS = 3
#: PeerGone(NotHere) limiter per sending connection: 1 per second, burst 3.
NOT_HERE_RATE = 1.0
NOT_HERE_BURST = 3
#: NotePreferred changes in a connection's first seconds are the initial announcement.
HOME_MOVE_GRACE = 5.0
#: -rate-config bursts are raised to at least one maximal SendPacket frame.
MIN_RATE_BURST = MAX_PACKET_SIZE + KEY_LEN

#: Disco packets start with "TS" + U+1F4AC and are at least magic + key + nonce long.
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"
DISCO_MIN_LEN = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN

#: HTTP headers of the upgrade.
FAST_START_HEADER = "Derp-Fast-Start"
IDEAL_NODE_HEADER = "Ideal-Node"
DERP_VERSION_HEADER = "Derp-Version"
DERP_PUBLIC_KEY_HEADER = "Derp-Public-Key"
#: CN prefix of the TLS meta-certificate carrying the server key.
META_CERT_CN_PREFIX = "derpkey"
#: WebSocket subprotocol; Go servers read at most this much per message.
WEBSOCKET_SUBPROTOCOL = "derp"
WEBSOCKET_MAX_MESSAGE = 32768


class FrameType(enum.IntEnum):
    """Frame type byte. ForwardPacket (0x0A) sits out of order; 0x0B-0x0F are unassigned."""

    SERVER_KEY = 0x01  # S->C  magic + server public key
    CLIENT_INFO = 0x02  # C->S  client key + nonce + box(JSON)
    SERVER_INFO = 0x03  # S->C  nonce + box(JSON)
    SEND_PACKET = 0x04  # C->S  destination key + packet
    RECV_PACKET = 0x05  # S->C  source key + packet
    KEEP_ALIVE = 0x06  # S->C  empty
    NOTE_PREFERRED = 0x07  # C->S  one byte, non-zero = this is my home
    PEER_GONE = 0x08  # S->C  key + reason
    PEER_PRESENT = 0x09  # S->C to watchers: key [+ ip16 + port [+ flags]]
    FORWARD_PACKET = 0x0A  # mesh: source key + destination key + packet
    WATCH_CONNS = 0x10  # mesh: subscribe to peer present/gone
    CLOSE_PEER = 0x11  # mesh: close every connection of a key
    PING = 0x12  # either way: 8 bytes
    PONG = 0x13  # either way: echo of the ping's 8 bytes
    HEALTH = 0x14  # S->C  problem text, empty = healthy
    RESTARTING = 0x15  # S->C  reconnect_in ms + try_for ms


class PeerGoneReason(enum.IntEnum):
    """Why a PeerGone was sent. MESH_CONN_BROKE never travels on the wire."""

    DISCONNECTED = 0x00
    NOT_HERE = 0x01
    MESH_CONN_BROKE = 0xF0


class PeerPresentFlags(enum.IntFlag):
    """Flags byte of PeerPresent; a zero value means an old server without flags."""

    IS_REGULAR = 0x01
    IS_MESH_PEER = 0x02
    IS_PROBER = 0x04
    NOT_IDEAL = 0x08


class DropReason(enum.StrEnum):
    """Labels of derp_packets_dropped; all are pre-created at zero like Go does."""

    UNKNOWN_DEST = "unknown_dest"
    UNKNOWN_DEST_ON_FWD = "unknown_dest_on_fwd"
    GONE_DISCONNECTED = "gone_disconnected"
    QUEUE_HEAD = "queue_head"
    QUEUE_TAIL = "queue_tail"
    WRITE_ERROR = "write_error"
    DUP_CLIENT = "dup_client"


def looks_like_disco(packet: bytes | memoryview) -> bool:
    """Classify a packet the way the server does for queue choice, metrics and NotHere."""
    return len(packet) >= DISCO_MIN_LEN and bytes(packet[:6]) == DISCO_MAGIC
