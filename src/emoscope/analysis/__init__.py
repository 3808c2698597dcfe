"""Pure statistics, no I/O and no model: statistical tests and intervals (stats.py), per-layer
statistics (layers.py), phase segmentation (phases.py) and feature drift (drift.py)."""
