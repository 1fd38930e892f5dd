"""tls/: DERP over TLS, and the meta-certificate that lets a client skip the 101."""

from __future__ import annotations

from typing import Any

from ..context import CaseContext
from ..registry import Fail, Info, Level, Need, case

S15 = "derp-protocol §1.5"
TLS = [Need.TLS]


def _chain_der(sslobj: Any) -> list[bytes]:
    """The peer's whole chain as sent (CPython's unverified-chain accessor)."""
    inner = getattr(sslobj, "_sslobj", sslobj)
    get = getattr(inner, "get_unverified_chain", None)
    if get is None:
        return []
    import _ssl

    return [c.public_bytes(_ssl.ENCODING_DER) for c in (get() or [])]


def _meta(ctx_sslobj: Any) -> Any:
    import warnings

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    for der in _chain_der(ctx_sslobj):
        cert = x509.load_der_x509_certificate(der)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # derpkey + 64 hex is 71 characters, over X.520's 64
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if cns and str(cns[0].value).startswith("derpkey"):
            return cert
    return None


@case("tls/1", "DERP works over TLS 1.2 or newer", level=Level.MUST, section="derp-protocol §1.1",
      quote="TLS: derper's minimum is TLS 1.2.", needs=TLS)
async def tls_works(ctx: CaseContext) -> str:
    c = await ctx.conn("A")
    v = c.ssl_object.version() if c.ssl_object else None
    if v not in ("TLSv1.2", "TLSv1.3"):
        raise Fail(f"negotiated {v}, want TLS 1.2 or 1.3")
    await c.ping()
    return f"{v}, handshake and Ping over TLS"


@case("tls/2", "The chain ends in a meta-certificate naming the server key", level=Level.SHOULD, section=S15,
      quote="Subject CommonName derpkey + the server's public key as 64 lowercase hex … appends this certificate … to the end of the chain",
      needs=TLS)
async def meta_cert(ctx: CaseContext) -> str:
    c = await ctx.conn("A")
    cert = _meta(c.ssl_object)
    if cert is None:
        raise Fail(f"no derpkey… certificate among the {len(_chain_der(c.ssl_object))} the server sent "
                   "(clients fall back to the 101 round trip)")
    import warnings

    from cryptography.x509.oid import NameOID

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cn = str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    if cn != "derpkey" + (c.core.server_key.hex() if c.core.server_key else ""):
        raise Fail(f"meta-certificate CN {cn[:23]}… does not name the ServerKey's key")
    return "derpkey<ServerKey> at the end of the chain"


@case("tls/3", "The meta-certificate's serial is the protocol version", level=Level.SHOULD, section=S15,
      quote="Serial number | the protocol version, 2 … Extensions | exactly one: Basic Constraints … (not a CA)", needs=TLS)
async def meta_serial(ctx: CaseContext) -> str:
    c = await ctx.conn("A")
    cert = _meta(c.ssl_object)
    if cert is None:
        raise Fail("no meta-certificate")
    if cert.serial_number != 2:
        raise Fail(f"serial {cert.serial_number}, want 2")
    from cryptography import x509

    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise Fail("no Basic Constraints extension") from None
    if bc.ca:
        raise Fail("the meta-certificate claims to be a CA")
    return "serial 2, not a CA"


@case("tls/4", "Which TLS version and ALPN the server picks", level=Level.INFORMATIONAL, section="derp-protocol §1.1",
      quote="The Go client offers no ALPN protocols. derper's manual and IP cert managers advertise ALPN http/1.1.", needs=TLS)
async def tls_version(ctx: CaseContext) -> str:
    c = await ctx.conn("A")
    s = c.ssl_object
    raise Info(f"{s.version()}, cipher {s.cipher()[0]}, {len(_chain_der(s))} certificates in the chain")


@case("tls/5", "Fast start with the key from the meta-certificate", level=Level.SHOULD, section=S15,
      quote="If the key is non-zero and the version is non-zero, the client: adds Derp-Fast-Start: 1 … sends ClientInfo right away.",
      needs=TLS)
async def meta_fast_start(ctx: CaseContext) -> str:
    c = await ctx.conn("A", use_meta_cert=True)
    if not c.core.fast_start:
        raise Fail("the client could not use fast start")
    await c.ping()
    return "fast start from the meta-certificate, then Ping"


@case("tls/6", "A plain-HTTP request to the TLS port gets no DERP", level=Level.SHOULD, section="derp-protocol §1.1",
      quote="Normally this is inside TLS (HTTPS, default port 443).", needs=TLS)
async def plain_on_tls(ctx: CaseContext) -> str:
    import asyncio

    u = ctx.target.derp
    reader, writer = await asyncio.open_connection(u.host, u.port)
    try:
        writer.write(f"GET {u.path} HTTP/1.1\r\nHost: {u.host_header}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n".encode())
        ctx.log.add("plain", "send", "http", line=f"GET {u.path} HTTP/1.1 (plain text to the TLS port)", headers=[])
        try:
            data = await asyncio.wait_for(reader.read(64), 3.0)
        except TimeoutError:
            data = b""
        ctx.log.add("plain", "recv", "bytes", len=len(data), hex=data[:48].hex())
        if b"101" in data[:16] or b"DERP\xf0\x9f\x94\x91" in data:
            raise Fail("the TLS port spoke DERP in the clear")
        return f"no DERP in the clear ({data[:20]!r})"
    finally:
        writer.close()
