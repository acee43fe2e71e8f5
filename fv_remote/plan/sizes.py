"""Which of a model's sizes the planner read from its config.json, and which it would take from transformers'
defaults (issue 26): `AutoConfig.for_model("llama")` fills a config lacking `hidden_size` with 4096, so a plan of
"the model" would silently be a plan of Llama-2-7B's shape. The planner lists what it read and refuses a missing
size unless `--assume-defaults`, which states each assumed value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fv_remote.core.errors import UserError

# (name shown, keys that may hold it in a config.json, required)
SIZES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("hidden_size", ("hidden_size", "n_embd", "d_model"), True),
    ("num_attention_heads", ("num_attention_heads", "n_head"), True),
    ("num_hidden_layers", ("num_hidden_layers", "n_layer"), True),
    ("vocab_size", ("vocab_size",), True),
    ("intermediate_size", ("intermediate_size", "n_inner", "ffn_dim"), True),
    ("num_key_value_heads", ("num_key_value_heads",), False),
    ("head_dim", ("head_dim",), False),
    ("max_position_embeddings", ("max_position_embeddings", "n_positions"), False),
)
# sizes a config may leave out by its family's own rule (not a default of transformers' config class)
RULES = {"num_key_value_heads": "= num_attention_heads (no grouped-query attention)",
         "head_dim": "= hidden_size / num_attention_heads",
         "max_position_embeddings": "unknown (prompt lengths are not checked against it)"}
FOUR_X = ("gpt2", "gptj")  # their MLP is 4 x hidden_size when n_inner is null


@dataclass
class SizeReport:
    path: str | None
    read: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    missing: dict[str, Any] = field(default_factory=dict)  # name -> the value transformers would assume

    def as_json(self) -> dict[str, Any]:
        return {"config": self.path, "read": self.read, "derived": self.derived, "assumed": self.missing}


def config_file(model: str, config: str | None) -> Path | None:
    """The config.json `cost.load_config` reads (None for a Hub id not in the local cache)."""
    if config:
        path = Path(os.path.expanduser(config))
        return path / "config.json" if path.is_dir() else path
    from fv_remote.models.loading import RELEASES, model_dir

    if model in RELEASES:
        if (model_dir(model) / "config.json").is_file():
            return model_dir(model) / "config.json"
        model = RELEASES[model].hub_repo
    if os.path.isdir(os.path.expanduser(model)):
        return Path(os.path.expanduser(model)) / "config.json"
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001 - an odd repo id: nothing cached to compare with
        return None
    return Path(found) if isinstance(found, str) else None


def config_name(config: str) -> str:
    """What to call the model of a --config given without --model: its `_name_or_path`, else the file's name."""
    path = config_file("", config)
    try:
        name = json.loads(path.read_text()).get("_name_or_path") if path is not None else None
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and name:
        return name
    if path is None:
        return config
    return path.parent.name if path.name == "config.json" else path.stem


def size_report(model: str, config: str | None, loaded: Any) -> SizeReport:
    """What `loaded` (the transformers config `cost.load_config` built) took from the file, and what not."""
    path = config_file(model, config)
    try:
        raw = json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        raw = None
    report = SizeReport(str(path) if raw is not None else None)
    if not isinstance(raw, dict):
        return report
    if isinstance(raw.get("text_config"), dict):
        raw = {**raw, **raw["text_config"]}
    text = loaded.get_text_config() if hasattr(loaded, "get_text_config") else loaded
    family = str(getattr(text, "model_type", raw.get("model_type", "")))
    for name, keys, required in SIZES:
        key = next((k for k in keys if raw.get(k) is not None), None)
        if key is not None:
            report.read[name] = raw[key]
        elif name == "intermediate_size" and family in FOUR_X:
            report.derived[name] = "= 4 x hidden_size (the family's rule)"
        elif not required:
            report.derived[name] = RULES[name]
        else:
            report.missing[name] = next((getattr(text, k) for k in keys if getattr(text, k, None) is not None), None)
    return report


def check_sizes(report: SizeReport, assume: bool) -> None:
    if report.missing and not assume:
        values = ", ".join(f"{k} (would be {v})" for k, v in report.missing.items())
        raise UserError(f"the config {report.path} is missing {values}: transformers would fill in its defaults "
                        "and the plan would be for another model; add them to the config, or pass "
                        "--assume-defaults to plan with those values")


def size_lines(report: SizeReport) -> list[str]:
    if report.path is None:
        return ["sizes: from transformers' config (no config.json found to check them against)"]
    lines = [f"read from the config {report.path}: " + ", ".join(f"{k} {v}" for k, v in report.read.items())]
    lines += [f"not in the config: {k} {rule}" for k, rule in report.derived.items()]
    lines += [f"assumed {k} {v} (not in the config: transformers' default, --assume-defaults)"
              for k, v in report.missing.items()]
    return lines
