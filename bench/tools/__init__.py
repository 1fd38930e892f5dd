"""``python -m bench.tools``: what derpkit's own tools cost — the conformance suite's runtime,
one probe cycle over a 100-node map (vs Go derpprobe), locust's DERP packets/s per core (vs
derpgen). Issue 16 part 5; figures and commands in docs/benchmarks.md."""
