"""Analyses on captured activations and SAE codes: layer statistics and phases (phases.py), feature
selectivity and shared/specific features (features.py), and the statistics they share (stats.py)."""
