"""From BreakHis files to model tensors: catalog, prepare (shards + manifest), splits,
geometry and decoding, stored pixels, Ray Data ingest and transforms, scoring inputs.

Empty on purpose: importing a module of this stage imports nothing else
(``breakhis X --help`` stays torch-free)."""
