"""Locust load generators for DERP relays; see ``loadtests/locustfile.py`` and docs/benchmarks.md."""
