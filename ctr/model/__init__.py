"""The model as served: the BentoML model store (`store`: save, read artifacts, load the
network), the segment table saved with it (`segments`), the forward pass (`runner`, the
only module that imports torch at import time), the network definition (`network`: DeepFM,
which training in `models/` builds and the store loads) and CTRModel's lean `/infer` route
(`app`).

May import: `ctr.features` (schema, transform spec), `ctr.settings`; never `models/` (the
offline side, above this package; `ctr.cli.provision` joins them). This `__init__` imports
nothing, so the gateway's process never loads torch.
"""
