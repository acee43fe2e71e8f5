"""A second device without a GPU: `fakegpu`, so that `make test` fails when a stage mixes devices (issue 24).

On a GPU, a tensor a stage creates without `device=` lands on the CPU and meets the model's activations on the GPU:
`RuntimeError: Expected all tensors to be on the same device`. On a CPU-only CI machine everything is on the CPU
and that mistake passes unseen. torch's `FakeTensorMode` can make fake `cuda` tensors on a CPU build, but they hold
no values (a stage that reads a top-1 id stops there) and indexing one fails on a CPU-only build (no CUDA device
guard is registered: `PyTorch is not linked with support for cuda devices`).

So this harness gives torch a second device with real values:
- `fakegpu` is PyTorch's PrivateUse1 backend, renamed and set up as a Python backend (torch's own
  `torch.utils.backend_registration._setup_privateuseone_for_python_backend`, which registers a device guard);
- `OnDevice` is a wrapper tensor subclass whose `.device` is `fakegpu:0` and which holds a real CPU tensor. Every
  aten op on it unwraps, runs on the CPU, and wraps the result again, after checking CUDA's rule: all tensor
  arguments on one device, except 0-dim CPU tensors (scalars) and the indices of advanced indexing, which CUDA
  also accepts from the CPU; anything else raises the same `Expected all tensors to be on the same device` error;
- `fake_gpu()` is a `TorchFunctionMode` that makes `device="fakegpu"` work everywhere: factories
  (`torch.zeros(..., device=x.device)`), `.to("fakegpu")` (so `model.to("fakegpu")` moves a model there), and
  the few Tensor methods whose C++ bindings would otherwise allocate on the backend (`x[i] = 3.0`, `.tolist()`).
  `.numpy()` of a tensor on it fails as on CUDA.

Autograd works through the wrapper (it sits below the autograd key), so FFV training runs here too.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

NAME = "fakegpu"
MISMATCHES: list[str] = []  # every mismatch raised, also those a broad `except` swallowed (tests check it is empty)
CPU = torch.device("cpu")
_INDEX_OPS: set = set()
_ready = False


def register() -> None:
    """Register the device now. Autograd's engine sizes its per-device queues at the first backward of the
    process, so tests/conftest.py calls this at import, before any test runs a backward."""
    _setup()


def _setup() -> torch.device:
    global _ready
    if not _ready:
        import torch.utils.backend_registration as registration

        class Guard(torch._C._acc.DeviceGuard):  # one device, so autograd's engine gives it a ready queue
            def type_(self):  # noqa: ANN202
                return torch._C._autograd.DeviceType.PrivateUse1

            def device_count(self) -> int:
                return 1

            def deviceCount(self) -> int:  # noqa: N802 - the C++ name
                return 1

        class Hooks(torch._C._acc.PrivateUse1Hooks):  # not "available": torch.accelerator, accelerate and
            def is_available(self) -> bool:          # transformers must not pick it for anything themselves
                return False

            def has_primary_context(self, dev_id) -> bool:  # noqa: ANN001
                return True

            def is_built(self) -> bool:
                return True

        if torch._C._get_privateuse1_backend_name() != NAME:
            registration._setup_privateuseone_for_python_backend(NAME, hook=Hooks(), device_guard=Guard())
        aten = torch.ops.aten
        _INDEX_OPS.update({aten.index.Tensor, aten.index_put_.default, aten._index_put_impl_.default,
                           aten.index_put.default})
        # Tensors that C++ code allocates on the device itself (a Python scalar wrapped on `x.device`, a composite
        # op's buffer) reach the backend's own kernels, not the wrapper: allocate them as wrappers too.
        _library.impl("empty.memory_format", _empty)
        _library.impl("empty_strided", _empty_strided)
        _library.impl("_copy_from", _copy_from)
        _ready = True
    return torch.device(NAME, 0)


_library = torch.library.Library("aten", "IMPL", "PrivateUse1")


def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):  # noqa: ANN001
    return OnDevice(torch.empty(size, dtype=dtype, layout=layout, memory_format=memory_format))


def _copy_from(src, dst, non_blocking=False):  # noqa: ANN001
    _unwrap(dst).copy_(_unwrap(src))
    return dst


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):  # noqa: ANN001
    return OnDevice(torch.empty_strided(size, stride, dtype=dtype, layout=layout))


def _on_fake(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == NAME


class OnDevice(torch.Tensor):
    """A real CPU tensor that says it lives on `fakegpu:0` and refuses to meet CPU tensors."""

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnDevice:
        out = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=torch.device(NAME, 0), requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self, **_: Any) -> str:  # type: ignore[override]
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        devices: set[str] = set()

        def see(x: Any) -> None:
            if isinstance(x, OnDevice):
                devices.add(f"{NAME}:0")
            elif isinstance(x, torch.Tensor) and x.dim() > 0:
                devices.add(str(x.device))

        tree_map(see, (args[0], args[2:]) if func in _INDEX_OPS else (args, kwargs))
        if len(devices) > 1 and func is not torch.ops.aten._to_copy.default:
            message = (f"Expected all tensors to be on the same device, but found at least two devices, "
                       f"{' and '.join(sorted(devices))}! (in {func}; fake-device check)")
            import traceback

            MISMATCHES.append(message + "\n" + "".join(traceback.format_stack(limit=12)[:-1]))
            raise RuntimeError(message)
        target = kwargs.get("device")
        if _on_fake(target):
            kwargs = {**kwargs, "device": CPU}
        plain = tree_map(_unwrap, args)
        if func is torch.ops.aten.histc.default and not plain[0].is_floating_point():
            # CUDA's histc takes integers (transformers' MoE counts experts with it off the CPU); the CPU's does not
            out = func(plain[0].float(), *plain[1:], **kwargs).to(plain[0].dtype)
        else:
            out = func(*plain, **tree_map(_unwrap, kwargs))
        if any(r.alias_info is not None and r.alias_info.is_write for r in func._schema.returns):
            return args[0]  # in-place: the wrapper already shows its element's new values
        if target is None or _on_fake(target):
            return tree_map(_wrap, out)
        return out


def _unwrap(x: Any) -> Any:
    return x.elem if isinstance(x, OnDevice) else x


def _wrap(x: Any) -> Any:
    return OnDevice(x) if type(x) is torch.Tensor else x


class _FakeGPUMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            device, dtype, _, _ = torch._C._nn._parse_to(
                *args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})
            if device is not None and device.type == NAME:
                self_ = args[0]
                base = _unwrap(self_)
                moved = base.to(dtype=dtype, copy=bool(kwargs.get("copy"))) if dtype is not None else (
                    base.clone() if kwargs.get("copy") else base)
                return self_ if (moved is base and isinstance(self_, OnDevice)) else OnDevice(moved)
        elif func is torch.Tensor.__setitem__ and isinstance(args[0], OnDevice) and isinstance(args[2], (int, float, bool)):
            args = (args[0], args[1], torch.tensor(args[2], dtype=args[0].dtype))  # a 0-dim CPU scalar, as CUDA takes
        elif func is torch.Tensor.tolist and isinstance(args[0], OnDevice):
            return args[0].elem.tolist()
        elif func is torch.Tensor.numpy and isinstance(args[0], OnDevice):
            raise TypeError(f"can't convert {NAME}:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first. (fake-device check)")
        elif _on_fake(kwargs.get("device")):
            return tree_map(_wrap, func(*args, **{**kwargs, "device": CPU}))
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_gpu():
    """Within: `fakegpu` is a device; move a model there with `model.to("fakegpu")`."""
    device = _setup()
    with _FakeGPUMode():
        yield device


def move_model(hf: Any) -> Any:
    """Move a transformers model's parameters and buffers to `fakegpu` (call inside `fake_gpu()`)."""
    return hf.to(NAME)
