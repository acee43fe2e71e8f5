"""fv-remote: function vectors in language models, locally or on NDIF."""

__version__ = "0.1.0"
