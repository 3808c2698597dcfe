"""Sparse autoencoders: architectures (model.py), training from one activation stream (train.py),
quality on held-out text (quality.py), the SAELens on-disk format (io.py) and loading from
anywhere (pretrained.py)."""

from .model import SAE, SAEConfig

__all__ = ["SAE", "SAEConfig"]
