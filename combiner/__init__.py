"""Chorus's data plane: serve an ensemble over KServe v2, fanning each request out to its
members on Triton and combining their answers."""

__version__ = "0.1.0"

__all__ = ["__version__"]
