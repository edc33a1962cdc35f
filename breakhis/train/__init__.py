"""Training on Ray Train V2: the run's config and plan, the worker loop and its pure
epoch pieces, what a run hands over, experiment tracking.

Empty on purpose: importing a module of this stage imports nothing else
(``breakhis X --help`` stays torch-free)."""
