"""Benchmarks run by ``breakhis benchmark NAME``: each module has one function returning a
result dataclass with the figures and a ``format_table()`` for the terminal."""
