"""The smallest change to NDIF's own model actors that lets them run on a machine without a GPU (test support).

What differs from ndif 0.1.2's `ModelActor` / `SandboxModelActor`, and nothing else:
- `load_from_disk` loads the model on the CPU with nnsight's own `HuggingFaceModel.from_model_key(..., dispatch=True)`
  (the stock one pins CUDA devices, sets GPU memory limits and verifies CUDA placement);
- `torch.cuda.synchronize` / `empty_cache` are no-ops when CUDA is absent (the stock actor calls them after every
  request);
- every executed request appends a JSON line when it starts and one when it ends to `$FV_REMOTE_NDIF_LOG` (id, trusted, payload and result bytes,
  seconds, outcome): the tests count requests from this server-side record, not from the client;
- `num_cpus=0`, so two actors fit the 2-core test machine's Ray node.
Scheduling, the queue, the sandbox runner, serialisation and execution are NDIF's code unchanged.
"""

from __future__ import annotations

import json
import os
import threading
import time

import ray
import torch
from nnsight.modeling.huggingface import HuggingFaceModel

from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from ndif.services.ray.sandbox.model import SandboxModelDeployment

if not torch.cuda.is_available():
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda *args, **kwargs: None

_LOG_LOCK = threading.Lock()


def _record(entry: dict) -> None:
    path = os.environ.get("FV_REMOTE_NDIF_LOG")
    if not path:
        return
    with _LOG_LOCK, open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


class _OnCPU:
    """Mixed in before NDIF's deployment class: CPU loading and the per-request record."""

    def load_from_disk(self):
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name, **self.kwargs)
        model._module.requires_grad_(False)  # as the stock actor: inference only
        return model

    def execute(self, request):
        start = time.time()
        entry = {"id": request.id, "model_key": self.model_key, "trusted": bool(request.trusted),
                 "payload_bytes": len(request.payload or b""), "start": start}
        _record({**entry, "outcome": "started"})
        try:
            blob, deserialize_ms = super().execute(request)
        except BaseException as exc:
            _record({**entry, "outcome": "error", "error": f"{type(exc).__name__}: {exc}"[:300],
                     "seconds": time.time() - start})
            raise
        _record({**entry, "outcome": "ok", "result_bytes": len(blob), "seconds": time.time() - start})
        return blob, deserialize_ms


@ray.remote(num_cpus=0, max_restarts=-1)
class CPUModelActor(_OnCPU, BaseModelDeployment):
    """NDIF's in-process actor (every request trusted), on the CPU."""


@ray.remote(num_cpus=0, max_restarts=-1)
class CPUSandboxModelActor(_OnCPU, SandboxModelDeployment):
    """NDIF's sandbox actor (untrusted requests run in a runner process with a weightless model), on the CPU."""
