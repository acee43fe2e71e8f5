"""fv-remote: function vectors in language models, locally or on NDIF."""

import warnings

__version__ = "0.1.0"

# transformers 5.2x renamed the forward's `past_key_values` to `cache` and warns on every cached-prefix forward
# (thousands per CMA run). The old name still works there, and is the only one older releases and NDIF's servers
# accept, so we keep it and keep the warning out of users' logs.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
