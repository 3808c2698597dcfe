"""Sparse autoencoders: architectures (model.py), training from one activation stream (train.py),
evaluation (evaluate.py) and the SAELens on-disk format (io.py)."""

from .model import SAE, SAEConfig

__all__ = ["SAE", "SAEConfig"]
