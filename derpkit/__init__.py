"""derpkit: a toolkit for people who run their own Tailscale DERP relays."""

__version__ = "0.1.0"
