"""The model as served: the BentoML model store (`store`: save, read artifacts, load the
network), the segment table saved with it (`segments`), the forward pass (`runner`, the
only module that imports torch at import time) and CTRModel's lean `/infer` route (`app`).
`provision` trains and stores a model when the store lacks one for the data.

May import: `ctr.features` (schema, transform spec), `ctr.settings`, and `models/` (the
network and training, lazily). This `__init__` imports nothing, so the gateway's process
never loads torch.
"""
