"""Generated BreakHis-shaped data (plan, tissue, render) for tests and the demo.

Empty on purpose: importing a module of this stage imports nothing else
(``breakhis X --help`` stays torch-free)."""
