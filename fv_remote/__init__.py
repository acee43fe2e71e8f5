"""fv-remote: function vectors in language models, locally or on NDIF.

The user-facing functions and classes are importable from here (`from fv_remote import load_model, run_task`);
they load on first use, so `import fv_remote` (and the CLI's start) stays cheap.
"""

import importlib
import warnings
from typing import Any

from fv_remote.core.version import __version__  # noqa: E402,F401 - the package's version

# transformers 5.2x renamed the forward's `past_key_values` to `cache` and warns on every cached-prefix forward
# (thousands per CMA run). The old name still works there, and is the only one older releases and NDIF's servers
# accept, so we keep it and keep the warning out of users' logs.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


def _drop_cache_rename_notice(record) -> bool:
    return "`past_key_values`/`cache_params` are deprecated" not in str(record.msg)


# The same rename is also logged once per process by transformers' own logger.
import logging as _logging  # noqa: E402

_logging.getLogger("transformers.utils.generic").addFilter(_drop_cache_rename_notice)


# module (under fv_remote) -> the public names it defines
_MODULES: dict[str, tuple[str, ...]] = {
    "models.loading": ("load_model", "LoadedModel",),
    "data": ("load_task", "list_tasks", "RelationTask",),
    "data.tasks": ("prepare_task", "PreparedTask",),
    "store.activations": ("ActivationStore",),
    "core.errors": ("UserError",),
    "execution": ("Executor", "Local", "DryRun", "NDIF", "JobSubmitted", "load_remote_model", "run_stage",),
    "execution.stage": ("Stage",),
    "execution.jobs": ("Job", "job_status"),
    "stages": ("STAGES", "fetch_job", "load_job"),
    "fv.extract": ("extract", "mean_heads_tensor",),
    "fv.cma": ("run_cma", "load_aie",),
    "fv.vectors": ("build_function_vector", "FunctionVector",),
    "fv.evaluate": ("fit_function_vector", "evaluate_task", "layer_sweep", "best_layer", "TaskScores",),
    "fv.pipeline": ("run_task", "PipelineSettings",),
    "fv.steering": ("Steer", "Condition", "generate", "generate_many", "score_conditions",),
    "baselines.residuals": ("read_residual_stream", "load_residuals",),
    "baselines.fit": ("fit_vector",),
    "relational.ffv": ("train_ffv", "finetune", "FinetuneSettings",),
    "relational.bank": ("RelationBank",),
    "relational.bank_build": ("build_bank",),
    "relational.analogy": ("run_analogies", "AnalogySettings",),
    "relational.decode": ("decode_many",),
    "export.llamacpp": ("write_control_vector", "import_control_vector",),
    "core.progress": ("Progress",),
}
_EXPORTS: dict[str, str] = {name: module for module, names in _MODULES.items() for name in names}

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
