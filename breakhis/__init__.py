"""breakhis: a Ray-native pipeline for BreakHis breast-cancer histopathology.

Train, tune and bulk-score benign-vs-malignant classifiers on BreakHis-style
tiles, and explain every prediction. See README.md for the two commands.
"""

__version__ = "0.1.0"
