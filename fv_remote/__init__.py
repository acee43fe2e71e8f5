"""fv-remote: function vectors in language models, locally or on NDIF."""

import warnings

__version__ = "0.1.0"

# transformers 5.2x renamed the forward's `past_key_values` to `cache` and warns on every cached-prefix forward
# (thousands per CMA run). The old name still works there, and is the only one older releases and NDIF's servers
# accept, so we keep it and keep the warning out of users' logs.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


def _drop_cache_rename_notice(record) -> bool:
    return "`past_key_values`/`cache_params` are deprecated" not in str(record.msg)


# The same rename is also logged once per process by transformers' own logger.
import logging as _logging  # noqa: E402

_logging.getLogger("transformers.utils.generic").addFilter(_drop_cache_rename_notice)
