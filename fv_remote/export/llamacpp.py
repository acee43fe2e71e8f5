"""Vectors out of (and into) the lab: llama.cpp control vectors.

A llama.cpp control vector is a GGUF file with `general.architecture = "controlvector"`, `controlvector.model_hint`
(repeng writes `config.model_type`), `controlvector.layer_count` (repeng: the number of directions) and one F32
1-D tensor `direction.<il>` per layer. llama.cpp (src/llama-adapter.cpp `llama_adapter_cvec::apply_to`, called as
`build_cvec(cur, il)` at the end of every block in src/models/*.cpp) adds direction il, times the strength given
with `--control-vector-scaled FILE S`, to the output of block il: after the MLP's residual add, at every position of
the prompt and of every generated token. common/common.cpp `common_control_vector_load_one` refuses a tensor for
layer 0 ("there's never a tensor for layer 0"), non-F32 and non-1-D tensors and names other than `direction.<n>`.

fv-remote's layer L is the output of block L too (`ad.layer(lm, L).output`: Hugging Face `model.layers[L]`,
`hidden_states[L + 1]`), so an FV at layer L is written as `direction.L` unchanged (`LAYER_RULE`). What cannot be
written faithfully is refused: layer 0 (llama.cpp has no slot for it), and distributed per-head vectors, which act
inside block l (the attention output, before block l's MLP); their per-layer sum at `direction.l` is offered with
`per_layer_sum=True` and labelled an approximation. Positions: an exported vector is added at every position; an FV
was found by adding it at the last token, so the scale that works differs (`evaluate --positions all
--sweep-scale`) and the sidecar note records the one found.

An imported control vector becomes a `FunctionVector` (kind from the file, else "cvec") whose `vector`/`layer` is
its first direction; further layers' directions (repeng writes one per layer) live in `meta["directions"]` as
{layer: list of floats} (a float32 survives JSON exactly), and `meta["positions"] = "all"` makes steering add it
at every position unless told otherwise (`steering.default_positions`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fv_remote.core.errors import UserError
from fv_remote.fv.vectors import DIRECTIONS_META, FunctionVector, directions

ARCH = "controlvector"
LAYER_RULE = ("direction.L is added to the output of transformer block L (0-based; Hugging Face model.layers[L], "
              "hidden_states[L+1]), after its MLP's residual add, at every position; fv-remote's layer L is the same "
              "place, so the index is unchanged. llama.cpp has no direction for layer 0.")


@dataclass
class Export:
    """What goes into a control-vector file: {layer: vector} and what the sidecar note says about it."""

    directions: dict[int, torch.Tensor]
    kind: str
    task: str
    source: str
    approximation: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _refuse_layer0(layers: list[int], what: str) -> None:
    if 0 in layers:
        raise UserError(f"{what} is added at layer 0 (the output of block 0), and llama.cpp has no control-vector "
                        f"direction for layer 0 (its loader refuses direction.0): it cannot be exported faithfully. "
                        f"Use a vector for layer >= 1 (e.g. `fv-remote fit --layer 1` or a sweep's next-best layer)")


def _check_finite(dirs: dict[int, torch.Tensor], what: str) -> None:
    for layer, vec in dirs.items():
        if not torch.isfinite(vec).all():
            raise UserError(f"{what}: the direction for layer {layer} has NaN/inf values; nothing was exported")


def from_vector(fv: FunctionVector, source: str, layer: int | None = None, distributed: bool = False,
                per_layer_sum: bool = False) -> Export:
    """An FV/FFV (or imported control vector) file. `distributed=True` exports its per-head vectors' per-layer sums,
    which needs `per_layer_sum=True` (an approximation, said in the note)."""
    what = f"this {fv.kind.upper()} ({source})"
    if distributed:
        if not fv.heads or fv.head_vectors is None:
            raise UserError(f"{what} has no per-head vectors; distributed export needs an FV built by "
                            f"`fv-remote fit`")
        if not per_layer_sum:
            raise UserError(
                f"{what} steered distributed adds each head's mean output inside its block (the attention output, "
                f"before that block's MLP); a llama.cpp control vector can only add at a block's output, so this "
                f"cannot be exported exactly. Add --per-layer-sum to export the sum of each layer's head vectors at "
                f"that layer's output instead (an approximation: the block's MLP then does not see it)")
        sums: dict[int, torch.Tensor] = {}
        for (lay, _), vec in zip(fv.heads, fv.head_vectors.float()):
            sums[int(lay)] = sums.get(int(lay), torch.zeros_like(vec)) + vec
        _refuse_layer0(sorted(sums), f"{what}: {sum(1 for h in fv.heads if h[0] == 0)} of its heads are at layer 0; "
                                     f"their sum")
        note = ("per-layer sum of the distributed per-head vectors (W_O slot x head mean, bias-free), each at its "
                "layer's block output: an approximation of distributed steering, which adds inside the block, "
                "before its MLP")
        return Export(dict(sorted(sums.items())), fv.kind, fv.task, source, approximation=note)
    if fv.apply == "replace":  # a task vector: llama.cpp only adds, so export what the patch adds on average
        if fv.base is None:
            raise UserError(f"{what} is patched in (replaces the residual stream) and records no mean zero-shot "
                            f"residual to turn it into an addition; rebuild it with `fv-remote fit --method "
                            f"task-vector`")
        if layer is not None and layer != fv.layer:
            raise UserError(f"{what} is the residual stream of layer {fv.layer}; --layer does not apply")
        _refuse_layer0([fv.layer], what)
        note = ("a task vector replaces the last token's residual stream; a control vector can only add, so this is "
                "its additive equivalent on average (vector minus the mean zero-shot residual at its layer, i.e. "
                "the mean difference), added at every position")
        return Export({int(fv.layer): (fv.vector - fv.base).float()}, fv.kind, fv.task, source, approximation=note)
    dirs = directions(fv)
    if layer is not None:
        if len(dirs) > 1 and layer != fv.layer:
            raise UserError(f"{what} has directions for {len(dirs)} layers; --layer does not apply")
        dirs = {int(layer): fv.vector}
    _refuse_layer0(sorted(dirs), what)
    return Export({k: v.float() for k, v in sorted(dirs.items())}, fv.kind, fv.task, source)


def from_bank_entry(bank: Any, name: str, source: str) -> Export:
    entry = bank.get(name)
    _refuse_layer0([entry.layer], f"bank entry {name!r} ({source})")
    return Export({int(entry.layer): entry.vector.float()}, "ffv", entry.name, f"{source}#{name}")


def from_weights(bank: Any, weights: torch.Tensor, label: str, source: str) -> Export:
    """A composite FV (Σ w_i FFV_i, one direction per layer the bank uses)."""
    from fv_remote.relational.analogy import composite_vector

    dirs = {int(k): v.float() for k, v in composite_vector(bank, weights).items()}
    _refuse_layer0(sorted(dirs), f"the CFV for {label} ({source})")
    top = sorted(zip(bank.names, weights.tolist()), key=lambda x: -x[1])[:5]
    return Export(dict(sorted(dirs.items())), "cfv", label, source,
                  meta={"cfv_weights": {n: round(w, 6) for n, w in zip(bank.names, weights.tolist())},
                        "cfv_top": [[n, round(w, 4)] for n, w in top]})


def parse_weights(bank: Any, text: str) -> torch.Tensor:
    """'antonym=0.5,synonym=0.5' -> a weight per bank entry (others 0)."""
    weights = torch.zeros(len(bank))
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise UserError(f"--weights takes NAME=WEIGHT pairs separated by commas, got {part!r}")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"--weights: {value!r} (for {name!r}) is not a number") from None
        if not math.isfinite(number):
            raise UserError(f"--weights: the weight of {name!r} is not finite")
        weights[bank.names.index(bank.get(name.strip()).name)] = number
    if not weights.abs().sum() > 0:
        raise UserError("--weights gives no non-zero weight")
    return weights


# --- writing ------------------------------------------------------------------------------------------------------


def model_hint(model: Any) -> str:
    """What repeng writes as controlvector.model_hint: the config's model_type."""
    config = getattr(model.hf, "config", None)
    config = getattr(config, "text_config", None) or config
    return str(getattr(config, "model_type", "") or "")


def check_fits(export: Export, model: Any) -> None:
    ad = model.adapter
    for layer, vec in export.directions.items():
        if vec.ndim != 1 or vec.shape[0] != ad.d_model:
            raise UserError(f"the direction for layer {layer} has shape {list(vec.shape)}, the model's residual "
                            f"stream is {ad.d_model}")
        if not 1 <= layer < ad.n_layers:
            raise UserError(f"layer {layer} is not a layer llama.cpp can steer in {model.model_id} (1..."
                            f"{ad.n_layers - 1})")
    _check_finite(export.directions, export.source)


def write_control_vector(path: str | Path, export: Export, model: Any, scale: float, scale_source: str) -> Path:
    """The GGUF (atomic: temp file + rename) and its sidecar note `<path>.json`. Directions are written at scale 1;
    the scale to use goes in the note and in `fv_remote.scale` (llama.cpp: --control-vector-scaled FILE SCALE)."""
    import gguf

    from fv_remote.core.version import __version__

    check_fits(export, model)
    from fv_remote.core.checks import atomic_save

    hint = model_hint(model)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(export.directions))
        writer.add_string("general.name", f"{export.kind} {export.task}".strip())
        writer.add_string("fv_remote.model", model.model_id)
        writer.add_string("fv_remote.kind", export.kind)
        writer.add_string("fv_remote.task", export.task)
        writer.add_string("fv_remote.source", export.source)
        writer.add_string("fv_remote.positions", "all")
        writer.add_float32("fv_remote.scale", float(scale))
        writer.add_string("fv_remote.layer_rule", LAYER_RULE)
        writer.add_string("fv_remote.approximation", export.approximation)
        writer.add_string("fv_remote.library_version", __version__)
        for layer, vec in export.directions.items():
            writer.add_tensor(f"direction.{layer}", vec.detach().float().cpu().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = atomic_save(write, path, "control vector")
    note = sidecar_note(path, export, model, hint, scale, scale_source)
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(note, indent=2) + "\n"), sidecar_path(path),
                "sidecar note")
    return path


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def sidecar_note(path: Path, export: Export, model: Any, hint: str, scale: float, scale_source: str) -> dict:
    layers = sorted(export.directions)
    return {
        "file": path.name,
        "format": "llama.cpp control vector (GGUF, general.architecture = controlvector)",
        "model": model.model_id,
        "model_hint": hint,
        "kind": export.kind,
        "task": export.task,
        "source": export.source,
        "layers": layers,
        "norms": {str(k): round(float(v.norm()), 6) for k, v in export.directions.items()},
        "layer_rule": LAYER_RULE,
        "positions": "all: llama.cpp adds each direction at every position of the prompt and of every generated "
                     "token. FVs and FFVs are found by adding them at the last token only (fv-remote's "
                     "--positions last); `fv-remote steer/evaluate --positions all` reproduces what llama.cpp does",
        "scale": scale,
        "scale_source": scale_source,
        "usage": f"llama-cli -m MODEL.gguf --control-vector-scaled {path.name} {scale:g}",
        "approximation": export.approximation or None,
        **export.meta,
    }


# --- reading --------------------------------------------------------------------------------------------------------


@dataclass
class ControlVectorFile:
    directions: dict[int, np.ndarray]
    fields: dict[str, Any]

    @property
    def n_embd(self) -> int:
        return next(iter(self.directions.values())).shape[0]


def _field_value(reader_field: Any) -> Any:
    try:
        return reader_field.contents()
    except Exception:  # noqa: BLE001 - an odd value type: keep what can be shown
        return None


def read_control_vector(path: str | Path) -> ControlVectorFile:
    """Read and check a control-vector GGUF as llama.cpp's loader does (names `direction.<n>`, n >= 1, F32, 1-D,
    one size); every problem is one UserError naming the file."""
    import gguf

    from fv_remote.core.kinds import kind_of, wrong_kind

    path = Path(path)
    if path.exists() and kind_of(path) not in ("gguf", "binary", "text"):
        raise wrong_kind(path, "a GGUF control vector")
    if not path.is_file():
        raise UserError(f"control vector file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: _field_value(f) for name, f in reader.fields.items()}
        tensors = list(reader.tensors)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file from the user's side
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UserError(f"{path} is not a readable GGUF file ({type(exc).__name__}{': ' + text if text else ''})") \
            from None
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise UserError(f"{path} is a GGUF with general.architecture {arch!r}, not a control vector "
                        f"({ARCH!r}): give a file written by `fv-remote export`, repeng or llama.cpp's cvector tools")
    if not tensors:
        raise UserError(f"{path} has no direction tensors")
    found: dict[int, np.ndarray] = {}
    for tensor in tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise UserError(f"{path}: tensor {tensor.name!r} is not named direction.<layer> (llama.cpp refuses it)")
        layer = int(index)
        if layer == 0:
            raise UserError(f"{path}: it has a direction for layer 0, which llama.cpp refuses (there is never a "
                            f"control vector for layer 0)")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise UserError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, not F32 (llama.cpp refuses it)")
        shape = [int(x) for x in tensor.shape if int(x) != 1] or [1]
        if len(shape) != 1:
            raise UserError(f"{path}: {tensor.name} has shape {list(map(int, tensor.shape))}, not 1-D")
        values = np.array(tensor.data, dtype=np.float32).reshape(-1)
        if found and values.shape[0] != next(iter(found.values())).shape[0]:
            raise UserError(f"{path}: {tensor.name} has {values.shape[0]} values, the other directions "
                            f"{next(iter(found.values())).shape[0]}")
        if not np.isfinite(values).all():
            raise UserError(f"{path}: {tensor.name} has NaN/inf values")
        found[layer] = values
    return ControlVectorFile(dict(sorted(found.items())), fields)


def import_control_vector(path: str | Path, model: Any, task: str | None = None) -> FunctionVector:
    """A control-vector GGUF as a steering vector for `model`, refusing one made for another model (dimension,
    layers, model hint, or the model fv-remote recorded)."""
    cvec = read_control_vector(path)
    ad, fields = model.adapter, cvec.fields
    hint, ours = fields.get(f"{ARCH}.model_hint"), model_hint(model)
    recorded = fields.get("fv_remote.model")
    if recorded and recorded != model.model_id:
        raise UserError(f"{path} was exported for model {recorded!r}, not {model.model_id!r}")
    if cvec.n_embd != ad.d_model:
        raise UserError(f"{path} has {cvec.n_embd}-dimensional directions (model hint {hint!r}); "
                        f"{model.model_id} has a {ad.d_model}-dimensional residual stream: it is for another model")
    if hint and ours and str(hint) != ours:
        raise UserError(f"{path} is for a {hint!r} model (controlvector.model_hint), {model.model_id} is {ours!r}")
    beyond = [layer for layer in cvec.directions if layer >= ad.n_layers]
    if beyond:
        raise UserError(f"{path} has directions for layers up to {max(beyond)}; {model.model_id} has "
                        f"{ad.n_layers} layers (0..{ad.n_layers - 1}): it is for another model")
    layers = sorted(cvec.directions)
    first = layers[0]
    meta: dict[str, Any] = {"positions": "all", "imported_from": str(path), "model_hint": hint,
                            "n_directions": len(layers)}
    for key in ("scale", "kind", "task", "source", "approximation"):
        if fields.get(f"fv_remote.{key}") not in (None, ""):
            meta[f"exported_{key}"] = fields[f"fv_remote.{key}"]
    if len(layers) > 1:
        meta[DIRECTIONS_META] = {str(layer): cvec.directions[layer].tolist() for layer in layers[1:]}
    kind = str(fields.get("fv_remote.kind") or "cvec")
    name = task or str(fields.get("fv_remote.task") or Path(path).name.split(".")[0])
    return FunctionVector(vector=torch.from_numpy(cvec.directions[first].copy()), model=model.model_id, task=name,
                          layer=first, kind=kind, meta=meta)


def scale_from_evaluation(json_path: str | Path, fv_path: str | Path, layer: int) -> tuple[float, str]:
    """The scale an `evaluate --positions all --sweep-scale` run chose for this vector (its JSON)."""
    path = Path(json_path)
    try:
        data = json.loads(path.read_text())
        settings = data["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--evaluation {path} is not an `fv-remote evaluate --json` file ({type(exc).__name__})") \
            from None
    if settings.get("positions") != "all":
        raise UserError(f"--evaluation {path} steered at positions {settings.get('positions', 'last')!r}; a control "
                        f"vector is added at every position, so take the scale from `fv-remote evaluate --positions "
                        f"all --sweep-scale 1,2,4,8 --json FILE`")
    if settings.get("fv") and Path(settings["fv"]).resolve() != Path(fv_path).resolve():
        raise UserError(f"--evaluation {path} evaluated {settings['fv']}, not {fv_path}")
    if int(data.get("layer", layer)) != layer:
        raise UserError(f"--evaluation {path} steered at layer {data.get('layer')}, the export is for layer {layer}")
    scale = float(settings["scale"])
    sweep = settings.get("scale_sweep")
    if isinstance(sweep, dict) and sweep:
        tried = ", ".join(f"{k}: {float(v):.2f}" for k, v in sweep.items())
        source = (f"best zero-shot validation accuracy in `fv-remote evaluate --positions all --sweep-scale` ({path}; "
                  f"scale: accuracy {tried})")
    else:
        source = f"the scale `fv-remote evaluate --positions all` used ({path})"
    return scale, source
