"""Sweeps on Ray Tune: the sweep's config, the search-space language, the leaderboard,
the driver that runs full training runs as trials.

Empty on purpose: importing a module of this stage imports nothing else
(``breakhis X --help`` stays torch-free)."""
