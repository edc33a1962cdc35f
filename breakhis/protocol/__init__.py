"""The paper's protocol: one model per split, trained and evaluated, summarised.

Empty on purpose: importing a module of this stage imports nothing else
(``breakhis X --help`` stays torch-free)."""
