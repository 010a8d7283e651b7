"""Distributed Deep Incremental Hashing (DIHN) for image retrieval."""

__version__ = "0.1.0"
