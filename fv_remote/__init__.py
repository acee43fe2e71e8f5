"""fv-remote: function vectors in language models, locally or on NDIF.

The user-facing functions and classes are importable from here (`from fv_remote import load_model, run_task`);
they load on first use, so `import fv_remote` (and the CLI's start) stays cheap.
"""

import importlib
import warnings
from typing import Any

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


# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # models, data, tasks, store
    "load_model": "models", "LoadedModel": "models", "load_task": "data", "list_tasks": "data",
    "RelationTask": "data", "prepare_task": "tasks", "PreparedTask": "tasks", "ActivationStore": "store",
    "UserError": "errors",
    # where a stage runs
    "Executor": "execution", "Local": "execution", "DryRun": "execution", "NDIF": "execution",
    "JobSubmitted": "execution", "load_remote_model": "execution", "no_wait": "execution",
    "save_job": "jobs", "fetch_job": "jobs", "job_status": "jobs",
    # stages
    "extract": "extract", "mean_heads_tensor": "extract", "run_cma": "cma", "load_aie": "cma",
    "build_function_vector": "vectors", "FunctionVector": "vectors", "fit_function_vector": "evaluate",
    "evaluate_task": "evaluate", "layer_sweep": "evaluate", "best_layer": "evaluate", "TaskScores": "evaluate",
    "run_task": "pipeline", "PipelineSettings": "pipeline",
    "Steer": "steering", "Condition": "steering", "generate": "steering", "generate_many": "steering",
    "score_conditions": "steering",
    "train_ffv": "ffv", "finetune": "ffv", "FinetuneSettings": "ffv", "build_bank": "bank",
    "RelationBank": "bank", "run_analogies": "analogy", "AnalogySettings": "analogy", "decode_many": "decode",
    "write_control_vector": "export", "import_control_vector": "export",
    "Progress": "progress",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fv_remote' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fv_remote.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
