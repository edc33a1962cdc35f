"""The measures every stage shares: classification metrics, calibration and decision
rules, patient-level bootstrap intervals. Pure numpy/scikit-learn; no Ray, no torch.

Empty on purpose: importing a module of this stage imports nothing else
(``breakhis X --help`` stays torch-free)."""
