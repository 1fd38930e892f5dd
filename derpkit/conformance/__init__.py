"""``derpkit conformance``: a black-box DERP conformance suite aimed at any server.

What h2spec is to HTTP/2 and Autobahn|Testsuite to WebSocket: small cases named by area
and number (``relay/2``, ``handshake/5``…), each checking one behaviour of the contract in
``derp-protocol.md`` and quoting the section it comes from, driven over real sockets with
the sans-IO connection core. Each case records its wire log (every frame sent and received,
with timestamps) and ends PASS, FAIL, SKIP or INFO with a one-line reason.

Modules: ``registry`` (cases, levels, results), ``target`` (what is tested and how to reach
it), ``wire`` (the per-case wire log), ``conn`` (connections that log what they see),
``http`` (raw HTTP/1.1 requests), ``cases/`` (the cases, one module per area), ``runner``
(select, run, time out), ``report`` (table, JSON, JUnit, HTML), ``cli`` and ``pytest_plugin``.
"""
