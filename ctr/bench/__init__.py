"""Benchmarks and planning, all printing figures, all against loopback only and bounded in
time: end to end beside monolith peers (`e2e`, `peer`, `loadgen`), feature tiers
(`features`), the model's batch table (`batching`), py-spy profiles (`profile`), capacity
planning (`capacity`) and starting a local server for them (`local_server`).

May import anything below the CLI; nothing on the serving path imports it.
"""
