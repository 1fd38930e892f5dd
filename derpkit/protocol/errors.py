"""Protocol errors carry a short, stable reason that becomes a metric label."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer broke the protocol; the shell closes that one connection.

    ``reason`` is a short snake_case label (used as a Prometheus label value and log key);
    ``detail`` is the human sentence for the log line.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
