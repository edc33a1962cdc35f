"""Evaluation of one model on its held-out patients: the data it reads, the result,
the report (HTML, figures, metrics.json).

Empty on purpose: importing a module of this stage imports nothing else
(``breakhis X --help`` stays torch-free)."""
