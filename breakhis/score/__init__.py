"""Batch scoring and the one inference engine: the predictor (Ray Data actor pool),
attribution maps, the scoring job's units, output and checks.

Empty on purpose: importing a module of this stage imports nothing else
(``breakhis X --help`` stays torch-free)."""
