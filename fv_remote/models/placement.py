"""Where a local model's weights live and in what precision: chosen once, like the executor (issue 24).

A `Placement` is three user-facing strings, read from the CLI's app-level options (`fv-remote --device cuda
--dtype bfloat16 extract ...`), the environment (`FV_REMOTE_DEVICE`, `FV_REMOTE_DTYPE`, `FV_REMOTE_DEVICE_MAP`,
`FV_REMOTE_OFFLOAD`) or the Python API (`Local(placement=Placement(device="cuda", dtype="bfloat16"))`):

- `device`: `cpu`, `cuda`, `cuda:N`, `mps`; empty = the GPU when CUDA is available, else the CPU;
- `dtype`: `float32` (default), `bfloat16`, `float16`, or `auto` (the checkpoint's own);
- `device_map`: empty (the whole model on `device`), `auto` / `balanced` / `balanced_low_0` / `sequential`
  (accelerate spreads the blocks over the GPUs, then the CPU, then disk), or a JSON object mapping module names to
  a GPU index, `cpu` or `disk` (accelerate's own format).

`from_pretrained_kwargs()` turns it into transformers' own loading options: weights go straight to the target
dtype and device (`device_map={"": device}` for one device: no fp32 copy on the CPU first), and accelerate's
hooks move activations between the places of a split model (CPU/disk offload into `offload_folder`).
Nothing here writes code that accelerate or transformers already have.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from fv_remote.core.errors import UserError

DTYPES = ("float32", "bfloat16", "float16", "auto")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
ENV = {"device": "FV_REMOTE_DEVICE", "dtype": "FV_REMOTE_DTYPE", "device_map": "FV_REMOTE_DEVICE_MAP",
       "offload_folder": "FV_REMOTE_OFFLOAD"}
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Placement:
    """Device, dtype and device map of a locally loaded model (strings, so that it is JSON-able and printable)."""

    device: str = ""  # "" = cuda when available, else cpu
    dtype: str = "float32"
    device_map: str = ""  # "" = everything on `device`
    offload_folder: str = ""  # where accelerate offloads to disk ("" = the model cache's offload/<name>)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", (self.device or "").strip().lower())
        dtype = (self.dtype or "float32").strip().lower()
        object.__setattr__(self, "dtype", DTYPE_ALIASES.get(dtype, dtype))
        object.__setattr__(self, "device_map", (self.device_map or "").strip())
        if self.device and not _DEVICE.match(self.device):
            raise UserError(f"unknown device {self.device!r}: use cpu, cuda, cuda:N or mps")
        if self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}: use {', '.join(DTYPES)}")
        self.map_value()  # a bad JSON map fails here, before any loading

    @classmethod
    def from_env(cls, **given: str | None) -> Placement:
        """Options given (not None) win over the environment variables, which win over the defaults."""
        values = {key: given.get(key) if given.get(key) is not None else os.environ.get(var, "")
                  for key, var in ENV.items()}
        return cls(**{k: v for k, v in values.items() if v})

    def with_(self, **changes: Any) -> Placement:
        return replace(self, **changes)

    # -- resolved values --------------------------------------------------------------------------------------------

    def resolved_device(self) -> str:
        """The device the model (or, with a device map, its inputs) goes to; checks that it exists here."""
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError(f"--device {device} asked for, but this torch has no CUDA device "
                                f"(torch {torch.__version__}, cuda {torch.version.cuda or 'not built in'}); "
                                "use --device cpu, or install a CUDA build of torch")
            index = int(device.split(":")[1]) if ":" in device else 0
            if index >= torch.cuda.device_count():
                raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("--device mps asked for, but MPS is not available here; use --device cpu")
        return device

    def torch_dtype(self) -> Any:
        """The torch dtype, or the string "auto" (transformers reads the checkpoint's)."""
        import torch

        return "auto" if self.dtype == "auto" else getattr(torch, self.dtype)

    def map_value(self) -> str | dict[str, Any] | None:
        """The device map as transformers takes it: None, a strategy name, or {module: gpu index | "cpu" | "disk"}."""
        text = self.device_map
        if not text:
            return None
        if text in MAP_STRATEGIES:
            return text
        if not text.startswith("{"):
            raise UserError(f"unknown device map {text!r}: use {', '.join(MAP_STRATEGIES)} or a JSON object "
                            "such as '{\"model.embed_tokens\": 0, \"model.layers.0\": \"cpu\", ...}'")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"device map is not valid JSON ({exc.msg} at character {exc.pos}): {text[:80]}") from None
        if not isinstance(value, dict) or not value:
            raise UserError("a JSON device map must be a non-empty object {module name: device}")
        for key, where in value.items():
            ok = (isinstance(where, int) and not isinstance(where, bool) and where >= 0) or (
                isinstance(where, str) and (where in ("cpu", "disk", "mps") or _DEVICE.match(where)))
            if not ok:
                raise UserError(f"device map entry {key!r}: {where!r} is not a device "
                                "(a GPU index, \"cuda:N\", \"cpu\" or \"disk\")")
        return value

    def from_pretrained_kwargs(self, offload_folder: str = "") -> dict[str, Any]:
        """transformers' `from_pretrained` options for this placement: the dtype, and a device map that puts the
        weights where they go as they are read (one device: `{"": device}`; a split: accelerate's map with CPU /
        disk offload). `low_cpu_mem_usage` is transformers 5's only loading path (kept explicit for older ones)."""
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype()}
        device_map = self.map_value()
        if device_map is None:
            kwargs["device_map"] = {"": self.resolved_device()}
        else:
            if self.device:
                self.resolved_device()
            kwargs["device_map"] = device_map
            kwargs["offload_folder"] = self.offload_folder or offload_folder or None
            kwargs["offload_state_dict"] = True
        return kwargs

    def describe(self) -> str:
        parts = [f"device={self.device or 'default'}", f"dtype={self.dtype}"]
        if self.device_map:
            parts.append(f"device_map={self.device_map}")
        return ", ".join(parts)

    def as_json(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype, "device_map": self.device_map,
                "offload_folder": self.offload_folder}


DEFAULT = Placement()

GiB = 2**30


def _dtype_bytes(placement: Placement, config: Any) -> int:
    import torch

    dtype = placement.torch_dtype()
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.empty(0, dtype=dtype).element_size()


def weights_bytes(source: str, placement: Placement, revision: str | None = None) -> int | None:
    """The weights' size in the placement's dtype, from the config alone (a weightless model on the meta device,
    accelerate's `init_empty_weights`); None when there is no readable config (a GGUF, a Hub id not cached)."""
    if source.endswith(".gguf"):
        return None
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(source, **({"revision": revision} if revision else {}))
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - no config here: loading says why
        return None
    n_params = sum(p.numel() for p in empty.parameters())
    return n_params * _dtype_bytes(placement, config)


def available_memory(device: str) -> int | None:
    """Free memory on `device` now: CUDA's `mem_get_info`, the CPU's MemAvailable; None when unknown (MPS)."""
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if device == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def placement_rows(hf: Any) -> list[dict[str, Any]]:
    """Where each block of a loaded model lives and the memory its weights take: one row per top-level piece
    (embeddings, each transformer block, final norm, head), consecutive blocks on the same device merged.
    A device map's `disk`/`cpu` entries (accelerate's `hf_device_map`) win over the tensors' own device (an
    offloaded block's weights sit on the meta device until its forward)."""
    import torch

    device_map = getattr(hf, "hf_device_map", None) or {}
    blocks = {f"{name}.{i}" for name, module in hf.named_modules()
              if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and name.count(".") <= 1
              for i in range(len(module))}
    pieces: list[tuple[str, list[Any]]] = []
    seen: set[int] = set()  # tied weights (embeddings = head) are counted once, where they first appear
    for name, module in hf.named_modules():
        if any(name.startswith(b + ".") for b in blocks):
            continue
        recurse = name in blocks
        tensors = [t for t in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
                   if id(t) not in seen]
        seen.update(id(t) for t in tensors)
        if tensors or recurse:
            pieces.append((name, tensors))
    rows: list[dict[str, Any]] = []
    for name, tensors in pieces:
        size = sum(t.numel() * t.element_size() for t in tensors)
        where = _mapped(device_map, name)
        if where is None:
            where = str(tensors[0].device) if tensors else "-"
        rows.append({"block": name, "device": where, "bytes": size})
    merged: list[dict[str, Any]] = []
    for row in rows:
        last = merged[-1] if merged else None
        if last and last["device"] == row["device"] and _same_list(last["last"], row["block"]):
            last["bytes"] += row["bytes"]
            last["block"] = f"{last['first']}-{row['block'].rsplit('.', 1)[1]}"
            last["last"] = row["block"]
        else:
            merged.append({**row, "first": row["block"], "last": row["block"]})
    return [{"block": r["block"], "device": r["device"], "bytes": r["bytes"]} for r in merged]


def _same_list(a: str, b: str) -> bool:
    pa, _, ia = a.rpartition(".")
    pb, _, ib = b.rpartition(".")
    return pa == pb and ia.isdigit() and ib.isdigit()


def _mapped(device_map: dict[str, Any], name: str) -> str | None:
    best = None
    for key, where in device_map.items():
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best[0]):
                best = (key, where)
    if best is None:
        return None
    where = best[1]
    return f"cuda:{where}" if isinstance(where, int) else str(where)


def parse_memory(text: str) -> int:
    """'80GiB', '40GB', '512MiB', '1e9' -> bytes (GiB/MiB binary, GB/MB decimal)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    if not match or match.group(2).lower() not in units:
        raise UserError(f"cannot read the memory size {text!r}: give e.g. 80GiB, 24GB or 512MiB")
    return int(float(match.group(1)) * units[match.group(2).lower()])


__all__ = ["DEFAULT", "DTYPES", "ENV", "MAP_STRATEGIES", "Placement", "available_memory", "parse_memory",
           "placement_rows", "weights_bytes"]
