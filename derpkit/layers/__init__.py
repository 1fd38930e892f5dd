"""scapy layers for DERP frames and STUN, for dissecting captures and crafting bad input.

``derpkit.layers.derp``: one layer per DERP frame type under ``DERPFrame`` (5-byte header);
``dissect_stream`` cuts a byte stream (after the HTTP upgrade) into frames.
``derpkit.layers.stun``: scapy's own STUN layer (``scapy.contrib.stun``) extended with the
attributes Tailscale uses (SOFTWARE, the old 0x8020 XOR-MAPPED-ADDRESS) and a FINGERPRINT
that is filled in on build. ``derpkit.layers.pcap``: a pcap of DERP-over-HTTP (dev mode,
plain TCP) and STUN turned back into per-connection frame sequences.

Importing this package imports scapy (slow-ish, ~0.3 s); nothing else in derpkit imports
it except the conformance cases that craft malformed input.
"""

from derpkit.layers.derp import DERPFrame, dissect_stream, split_http_head
from derpkit.layers.stun import STUNSoftware, tailscale_binding_request

__all__ = ["DERPFrame", "STUNSoftware", "dissect_stream", "split_http_head", "tailscale_binding_request"]
