"""Hypothesis strategies that build inputs close to valid ones, so the fuzz reaches past the
first length check: DERP frames with real types and plausible lengths, HTTP heads from the
pieces smuggling is made of, STUN messages with the cookie, DERP-map-shaped JSON."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from derpkit.protocol.constants import FrameType

FRAME_TYPES = [int(t) for t in FrameType] + [0, 0x7F, 0xFF]


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    ftype = draw(st.sampled_from(FRAME_TYPES))
    payload = draw(st.binary(max_size=120))
    # Mostly honest lengths, sometimes a lie (short, long, huge).
    length = draw(st.one_of(st.just(len(payload)), st.integers(0, 200), st.sampled_from([1 << 20, 0xFFFFFFFF])))
    return struct.pack(">BI", ftype, length) + payload


frame_stream = st.lists(frame(), max_size=8).map(b"".join)
cuts = st.binary(max_size=16)

_NAMES = ["Host", "Content-Length", "content-length", "Transfer-Encoding", "Connection", "Upgrade",
          "Derp-Fast-Start", "X-A", "Content-Length ", "X(A", ""]
_VALUES = ["0", "10", "3, 3", "+3", "chunked", "Chunked", "gzip, chunked", "DERP", "websocket", "close",
           "keep-alive", "h", "a b", "1", "", " 5 ", "\t7", "a\x00b", "a\rb", "99999999999999999999"]
_ENDS = ["\r\n"] * 8 + ["\n", "\r", "\r\n "]


@st.composite
def request_head(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "CONNECT", "POST", "get", "G(T", ""]))
    target = draw(st.sampled_from(["/derp", "/", "x:443", "/robots.txt", "", "/a b", "*"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "HTTP/1.2"]))
    sep = draw(st.sampled_from([" "] * 6 + ["  ", "\t"]))
    out = method + sep + target + " " + version + draw(st.sampled_from(_ENDS))
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(_NAMES))
        value = draw(st.one_of(st.sampled_from(_VALUES), st.text(max_size=8)))
        colon = draw(st.sampled_from([": ", ":", " : ", ": "]))
        out += name + colon + value + draw(st.sampled_from(_ENDS))
    out += draw(st.sampled_from(["\r\n"] * 4 + ["\n", ""]))
    body = draw(st.binary(max_size=16))
    return out.encode("utf-8", "surrogatepass") + body


@st.composite
def stun_message(draw: st.DrawFn) -> bytes:
    mtype = draw(st.sampled_from([0x0001, 0x0101, 0x0111, 0x0002, draw(st.integers(0, 0xFFFF))]))
    attrs = b""
    for _ in range(draw(st.integers(0, 5))):
        atype = draw(st.sampled_from([0x0001, 0x0020, 0x8022, 0x8028, 0x0003, 0x802C, 0x0009,
                                      draw(st.integers(0, 0xFFFF))]))
        value = draw(st.binary(max_size=24))
        alen = draw(st.one_of(st.just(len(value)), st.integers(0, 40)))
        attrs += struct.pack(">HH", atype, alen) + value + b"\x00" * (-len(value) % 4)
    length = draw(st.one_of(st.just(len(attrs)), st.integers(0, 0xFFFF)))
    cookie = draw(st.sampled_from([b"\x21\x12\xa4\x42"] * 4 + [b"\x00\x00\x00\x00"]))
    return struct.pack(">HH", mtype, length) + cookie + draw(st.binary(min_size=12, max_size=12)) + attrs


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
                       st.text(max_size=12))
json_value = st.recursive(_json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)), max_leaves=20)

_node_keys = ["Name", "RegionID", "HostName", "IPv4", "IPv6", "STUNPort", "DERPPort", "STUNOnly", "CertName",
              "InsecureForTests", "CanPort80", "STUNTestIP"]


@st.composite
def derp_map(draw: st.DrawFn) -> object:
    nodes = []
    for _ in range(draw(st.integers(0, 3))):
        nodes.append({k: draw(json_value) if draw(st.booleans()) else draw(st.sampled_from(
            ["1a", "127.0.0.1", "::1", 3478, 443, True, "", -1, 1 << 40])) for k in
            draw(st.lists(st.sampled_from(_node_keys), max_size=8, unique=True))})
    region = {"RegionID": draw(st.sampled_from([1, 0, -1, "1", 900])), "RegionCode": draw(st.text(max_size=4)),
              "Nodes": nodes}
    if draw(st.booleans()):
        region[draw(st.sampled_from(["Avoid", "NoMeasureNoHome", "RegionName"]))] = draw(json_value)
    key = draw(st.sampled_from(["1", "0", "x", "900", "-1"]))
    top = {"Regions": {key: region}}
    if draw(st.booleans()):
        top[draw(st.sampled_from(["OmitDefaultRegions", "HomeParams", "regions"]))] = draw(json_value)
    return top
