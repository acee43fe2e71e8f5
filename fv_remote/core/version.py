"""The library's version, written into every file it makes (store, vector, bank provenance)."""

__version__ = "0.1.0"
