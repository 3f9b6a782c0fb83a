"""ndm-seq: dialogue sequence modeling with Neural Decompositional Memory."""

__version__ = "0.1.0"
