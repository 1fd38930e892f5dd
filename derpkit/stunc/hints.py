"""What a silent or refusing STUN server usually means, in words an operator can act on.

Kept apart from the CLI so the NAT discovery and ``-count`` summaries give the same advice.
A silent UDP port is the most common STUN support question, and most of its causes are on
the path (firewalls, security groups, a wrong port), not on the server.
"""

from __future__ import annotations

from derpkit.gosyntax import format_duration

__all__ = ["fallback_note", "silence_hint"]


def go_duration(seconds: float) -> str:
    """``seconds`` as Go prints a ``time.Duration`` (``3s``, ``500ms``)."""
    return format_duration(round(seconds * 1e9))


def silence_hint(
    server: str, port: int, timeout: float, *, shapes: tuple[str, ...], sent: int, icmp_errors: int
) -> str:
    """The message for "nothing came back": first line the fact, then the usual causes.

    ``shapes`` are the request shapes tried (``tailscale``, ``plain``), ``sent`` how many
    datagrams went out in total; ``icmp_errors`` counts ICMP errors the kernel reported.
    """
    copies = f" ({sent} requests sent)" if sent > 1 else ""
    lines = [
        f"no STUN reply from {server} within {go_duration(timeout)}{copies}: "
        f"is UDP port {port} open?"
    ]
    if icmp_errors:
        lines.append(
            f"  - the kernel reported {icmp_errors} ICMP error(s) for these requests: something "
            "on the path rejects them"
        )
    lines.append(
        f"  - check firewalls and cloud security groups for UDP (not TCP) {port} in both "
        f"directions, and that the server runs STUN (derper -stun, default on; -stun-port "
        f"{port}); a wrong port with ICMP filtered looks exactly like this"
    )
    if shapes == ("tailscale", "plain"):
        lines.append(
            "  - both a Tailscale-shaped request (SOFTWARE tailnode + FINGERPRINT) and a plain "
            "RFC 5389 one went unanswered, so this is not Go derper ignoring a generic request "
            "(Go derper only answers Tailscale-shaped requests)"
        )
    elif shapes == ("plain", "tailscale"):
        lines.append(
            "  - a plain RFC 5389 request and then a Tailscale-shaped one went unanswered (Go "
            "derper only answers Tailscale-shaped requests, so the second try was for it)"
        )
    else:
        lines.append(
            "  - Go derper only answers Tailscale-shaped requests, so a generic STUN tool timing "
            "out against it proves nothing"
        )
    lines.append("  - UDP can be lost: retry with -count 5, -retries 3 or a longer -timeout")
    return "\n".join(lines)


def fallback_note(first: str, server: str) -> str:
    """One line for "the first request shape was ignored, the other one was answered"."""
    if first == "plain":
        return (
            f"note: {server} ignored the plain RFC 5389 request but answered a Tailscale-shaped "
            "one: a Tailscale-only server (Go derper, or derpkit serve without -stun-strict=false); Tailscale "
            "clients are fine, generic STUN tools will see silence"
        )
    return (
        f"note: {server} ignored the Tailscale-shaped request but answered a plain RFC 5389 one: "
        "not a Tailscale-compatible STUN server (Tailscale clients will get no answer)"
    )
