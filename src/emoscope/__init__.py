"""emoscope: mechanistic analysis of emotion inference in language models."""

__version__ = "0.1.0"
