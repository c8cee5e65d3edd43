"""ctr-serve: a CTR prediction service packaged with BentoML.

The library behind service.py, one package per concern (docs/architecture.md):
`api` (the HTTP contract and routes), `serving` (the gateway's request path),
`resilience` (breaker, retries, deadlines), `observe` (SLIs, logs, progress),
`features` (schema, transform, tiered store), `model` (network, runner, model store,
segment table), `bench`, `ship` and `cli` (the outer shell). Everything here runs
without a server.

This `__init__` imports nothing: `import ctr.settings` (training, the CLI) must not load
BentoML, aiohttp or Starlette (tests/test_layout.py checks it in a fresh interpreter).
Import what you use from its module, e.g. `from ctr.serving.gateway import Gateway`.
"""
