"""Benchmarks for DERP servers: ``python -m bench --help``; results in docs/benchmarks.md."""
