"""Guards at the edges of a command: outputs written atomically and never lost, inputs bounded and finite, and a
record of what a run kept (for the line an interrupted run prints).

- `check_output_path` before any work: a `--json`/`--out`/`--plot` naming a folder, or under a file, is refused
  at once rather than after an hour of computing;
- `write_output` / `atomic_save`: temp file + rename in the target folder, so a crash never leaves half a file;
  when the write fails anyway (disk full, permissions) the results go to a fallback file and the error says where;
- `require_finite`: a vector, rating or activation with NaN/inf is an error naming the file, never a table of nan;
- `check_prompt_lengths`: prompts against the model's context before any forward pass;
- `note_kept` / `kept_line`: what was committed or saved so far, for an interrupted run's last line.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fv_remote.core.errors import UserError

# --- what a run kept ----------------------------------------------------------------------------------------------

_KEPT: dict[str, str] = {}


def note_kept(key: str, line: str) -> None:
    """Record (or update) what this run has committed or saved under `key` (e.g. a store group, an output file)."""
    _KEPT[key] = line


def kept_line() -> str:
    if not _KEPT:
        return "nothing was saved by this run"
    return "kept " + "; ".join(_KEPT.values())


def reset_kept() -> None:
    _KEPT.clear()


# --- outputs -----------------------------------------------------------------------------------------------------


OUTPUT_KINDS = {"--json": "json", "--plot": "png", "--save-combiner": "combiner"}


def check_output_path(path: str | Path | None, flag: str, kind: str | None = None) -> Path | None:
    """Refuse an output path that cannot be written as a file: an existing folder, or a file in the way above it;
    and one holding another kind of fv-remote file than `kind` (`core.kinds`; from the flag for --json/--plot)."""
    if path is None:
        return None
    path = Path(path)
    if str(path).strip() == "":
        raise UserError(f"{flag} is empty; give a file name")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name such as {path / _example(flag)}")
    parent = path.parent
    while str(parent) not in ("", ".", "/") and not parent.exists():
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    kind = kind or OUTPUT_KINDS.get(flag)
    if kind:
        from fv_remote.core.kinds import check_output_kind

        check_output_kind(path, flag, kind)
    return path


def _example(flag: str) -> str:
    return {"--json": "results.json", "--plot": "plot.png"}.get(flag, "out.safetensors")


def _tmp_name(path: Path) -> Path:
    # Keep the suffix: matplotlib and safetensors writers look at it.
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def atomic_save(save: Callable[[Path], Any], path: str | Path, what: str = "output") -> Path:
    """`save(tmp)` then rename onto `path`: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise UserError(_os_message(exc, path, what)) from None
    except BaseException:
        _remove(tmp)
        raise
    note_kept(str(path), f"{what} {path}")
    return path


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing or unparsable one is a UserError naming `what`."""
    from safetensors import safe_open

    if Path(path).is_dir():
        from fv_remote.core.kinds import wrong_kind

        raise wrong_kind(path, f"a {what} file")
    if not Path(path).is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}, fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file from the user's side
        raise UserError(f"{path} is not a {what} file ({type(exc).__name__}: {exc})") from None


def write_output(path: str | Path, text: str, flag: str = "--json", what: str = "results") -> Path:
    """Write `text` atomically; if that fails, save it to a fallback file and raise an error that says where."""
    path = Path(path)
    try:
        return atomic_save(lambda tmp: tmp.write_text(text, encoding="utf-8"), path, what)
    except UserError as exc:
        fallback = _fallback(path, text)
        where = f"; the {what} were saved to {fallback} instead" if fallback else \
            f"; the {what} could not be saved anywhere"
        raise UserError(f"{flag}: {exc}{where}") from None


def _fallback(path: Path, text: str) -> Path | None:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"fv-remote-{path.stem or 'results'}-{stamp}-{os.getpid()}{path.suffix or '.json'}"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        target = folder / name
        try:
            target.write_text(text, encoding="utf-8")
            note_kept(str(target), f"results {target}")
            return target
        except OSError:
            continue
    return None


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _os_message(exc: OSError, path: Path, what: str) -> str:
    from fv_remote.core.errors import os_error_message

    return os_error_message(exc, f"{what} {path}", "write") or \
        f"cannot write {what} {path}: {exc.strerror or exc}"


def json_text(data: Any) -> str:
    """JSON for results: NaN/inf (not JSON) become null, listed under "non_finite" so the file says why."""
    import json
    import math

    bad: list[str] = []

    def clean(value: Any, where: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(where or "(top)")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            return clean(value.item(), where)
        return value

    data = clean(data, "")
    if bad and isinstance(data, dict):
        data["non_finite"] = {"fields": bad, "why": "not a number (undefined, e.g. a correlation of constant "
                                                    "values); written as null"}
    return json.dumps(data, indent=2, default=float, allow_nan=False)


# --- finite numbers ----------------------------------------------------------------------------------------------


def require_finite(values: Any, what: str, fix: str = "") -> None:
    """Refuse a tensor/array with NaN or inf: name what it is and how many entries are bad."""
    import numpy as np

    arr = values.detach().float().cpu().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=float)
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise UserError(f"{what} has {bad} NaN/inf value(s) of {arr.size}" + (f"; {fix}" if fix else ""))


def require_finite_vector(vec: Any, path: str | Path) -> None:
    """An FV/FFV file whose vector (or per-head parts, used for distributed steering) holds NaN/inf."""
    fix = "it cannot steer anything; fit or fine-tune it again"
    kind = str(getattr(vec, "kind", "fv")).upper()
    require_finite(vec.vector, f"{path}: the {kind}", fix)
    for name in ("head_means", "head_vectors"):
        part = getattr(vec, name, None)
        if part is not None:
            require_finite(part, f"{path}: the {kind}'s {name}", fix)


F = TypeVar("F", bound="float | None")


def require_finite_option(flag: str, value: F) -> F:
    """A float option given as nan/inf (click accepts both) would turn every number it touches into NaN."""
    import math

    if value is not None and not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    return value


def check_vector_fits(vec: Any, model: Any, path: str | Path) -> None:
    """Heads and per-head means must exist in this model (distributed steering indexes them)."""
    ad = model.adapter
    for layer, head in vec.heads:
        if not (0 <= layer < ad.n_layers and 0 <= head < ad.n_heads):
            raise UserError(f"{path}: head ({layer}, {head}) does not exist in {model.model_id} ({ad.n_layers} "
                            f"layers x {ad.n_heads} heads)")
    if vec.head_means is not None and vec.heads and vec.head_means.shape[1] != ad.head_dim:
        raise UserError(f"{path}: head_means are {vec.head_means.shape[1]}-dimensional, the model's heads "
                        f"{ad.head_dim}")


def require_count(flag: str, value: int | None, most: int, why: str) -> int | None:
    """A positive count that is not absurd: above `most` it would run for hours or exhaust memory."""
    from fv_remote.core.errors import require_positive

    if value is None:
        return None
    require_positive(flag, value)
    if value > most:
        raise UserError(f"{flag} {value} is more than {most} ({why}); ask for fewer")
    return value


MAX_BOOT = 100_000  # bootstrap resamples: the interval is stable long before this
MAX_STEPS = 100_000  # optimiser steps


MAX_SCALE = 1000.0  # an FV is about the residual stream's size: 1000x of it only overflows the forward pass


def check_scale(scale: float, flag: str = "--scale") -> float:
    require_finite_option(flag, scale)
    if abs(scale) > MAX_SCALE:
        raise UserError(f"{flag} {scale:g} is out of range: the vector is about the size of the model's residual "
                        f"stream, so use a value between -{MAX_SCALE:g} and {MAX_SCALE:g} (1 is the usual one)")
    return scale


# --- bounded inputs ----------------------------------------------------------------------------------------------


def context_length(model: Any) -> int | None:
    """The most tokens the model takes (max_position_embeddings / n_positions / n_ctx), None when unknown."""
    config = getattr(getattr(model, "hf", None), "config", None) or getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(getattr(model, "tokenizer", None), "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10 ** 7 else None


def check_prompt_lengths(model: Any, texts: Sequence[str], what: str = "prompt",
                         reserve: int = 0) -> list[int]:
    """Token counts of `texts`; refuse before any forward pass if the longest exceeds the model's context
    (`reserve`: room needed after the prompt, e.g. generated tokens). Empty prompts are refused too."""
    tokenizer = model.tokenizer
    lengths = [len(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    for text, n in zip(texts, lengths):
        if not text.strip() or n == 0:
            raise UserError(f"{what} is empty; give some text")
    limit = context_length(model)
    if limit and lengths and max(lengths) + reserve > limit:
        i = max(range(len(lengths)), key=lengths.__getitem__)
        preview = texts[i][:60].replace("\n", "\\n")
        extra = f" + {reserve} to generate" if reserve else ""
        raise UserError(f"the longest {what} has {lengths[i]} tokens{extra}, more than the model's context of "
                        f"{limit} ({preview!r}...); use fewer shots (--n-shots) or shorter entries")
    return lengths
