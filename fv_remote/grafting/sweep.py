"""The pathway report: accuracy under the standard grafting configurations, per layer group.

Rows are configurations (which positions / components use fine-tuned weights), columns are layer groups (all
layers, then quarters). Input embeddings are grafted together with the block components wherever a row grafts
all block components and the column contains layer 0; the unembedding (final norm + LM head) is grafted only in
rows that say "+ unembed".
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fv_remote.grafting.graft import BLOCK_COMPONENTS, GraftConfig, Grafter, layer_groups
from fv_remote.grafting.synthetic import GraftPrompt
from fv_remote.core.progress import Progress


@dataclass(frozen=True)
class Pathway:
    """A row: positions and components grafted in every layer of the column's group."""

    label: str
    positions: str = "none"
    components: tuple[str, ...] = BLOCK_COMPONENTS
    unembed: str | None = None
    per_group: bool = True  # False: the row does not depend on the layer group (reference rows)
    special: str | None = None  # "pretrained" / "finetuned"

    def config(self, group: str, layers: list[int]) -> GraftConfig:
        embed = self.components == BLOCK_COMPONENTS and 0 in layers and self.positions != "none"
        return GraftConfig(positions=self.positions, layers=group if self.per_group else "none",
                           components=self.components if self.per_group else (), embed=embed,
                           unembed=self.unembed, label=self.label)


STANDARD_PATHWAYS: tuple[Pathway, ...] = (
    Pathway("pretrained", per_group=False, special="pretrained"),
    Pathway("fine-tuned", per_group=False, special="finetuned"),
    Pathway("first entity (enrichment)", positions="entity"),
    Pathway("last token (recall)", positions="last"),
    Pathway("last token + unembed", positions="last", unembed="last"),
    Pathway("entity + last", positions="entity+last"),
    Pathway("entity + last + unembed", positions="entity+last", unembed="last"),
    Pathway("complement of entity + last", positions="not(entity+last)"),
    Pathway("last token: o + mlp", positions="last", components=("o", "mlp")),
    Pathway("last token: o only", positions="last", components=("o",)),
    Pathway("last token: mlp only", positions="last", components=("mlp",)),
    Pathway("last token: q + k + v", positions="last", components=("q", "k", "v")),
    Pathway("unembed only (last token)", positions="none", unembed="last", per_group=False),
)


@dataclass
class SweepResult:
    rows: list[str]
    columns: list[str]
    column_layers: dict[str, list[int]]
    k: int
    n_prompts: int
    values: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # row -> column -> summary
    configs: dict[str, dict[str, str]] = field(default_factory=dict)  # row -> column -> description

    def metric(self, row: str, column: str, name: str | None = None) -> float:
        return self.values[row][column][name or f"top{self.k}"]

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "columns": self.columns, "column_layers": self.column_layers, "k": self.k,
                "n_prompts": self.n_prompts, "values": self.values, "configs": self.configs}

    def markdown(self, metric: str | None = None) -> str:
        metric = metric or f"top{self.k}"
        head = "| configuration | " + " | ".join(f"{c} ({layer_span(self.column_layers[c])})" for c in self.columns)
        lines = [head + " |", "|---" * (len(self.columns) + 1) + "|"]
        for row in self.rows:
            cells = [_fmt(self.values[row][c][metric], metric) for c in self.columns]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "sweep.json", "csv": out / "sweep.csv", "md": out / "sweep.md",
                 "png": out / "sweep.png"}
        paths["json"].write_text(json.dumps(self.to_json(), indent=2))
        with open(paths["csv"], "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["configuration", "layers", "layer_range", f"top{self.k}", "top1", "mean_prob",
                             "median_rank", "n"])
            for row in self.rows:
                for col in self.columns:
                    v = self.values[row][col]
                    writer.writerow([row, col, layer_span(self.column_layers[col]), v[f"top{self.k}"], v["top1"],
                                     v["mean_prob"], v["median_rank"], v["n"]])
        md = [f"top-{self.k} accuracy of the target's first token ({self.n_prompts} held-out prompts)", "",
              self.markdown(), "", "mean probability of the target's first token", "",
              self.markdown("mean_prob")]
        paths["md"].write_text("\n".join(md) + "\n")
        plot(self, paths["png"])
        return paths


def layer_span(layers: list[int]) -> str:
    """A layer group as "L4-7" ("L4" for one layer, "-" for none)."""
    if not layers:
        return "-"
    return f"L{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"L{layers[0]}"


def _fmt(value: float, metric: str) -> str:
    if metric == "median_rank":
        return f"{value:.0f}"
    return f"{value:.3f}" if metric == "mean_prob" else f"{value:.2f}"


def run_sweep(grafter: Grafter, prompts: Sequence[GraftPrompt], pathways: Sequence[Pathway] = STANDARD_PATHWAYS,
              groups: Sequence[str] = ("all", "q1", "q2", "q3", "q4"), k: int = 5, batch_size: int = 32,
              progress: Progress | None = None) -> SweepResult:
    """Evaluate every pathway in every layer group (reference rows once, copied across the columns)."""
    named = layer_groups(grafter.adapter.n_layers)
    column_layers = {g: named[g] for g in groups}
    result = SweepResult(rows=[p.label for p in pathways], columns=list(groups), column_layers=column_layers, k=k,
                         n_prompts=len(prompts))
    jobs = sum(len(groups) if p.per_group else 1 for p in pathways)
    done = 0
    for pathway in pathways:
        result.values[pathway.label], result.configs[pathway.label] = {}, {}
        cached = None
        for group in groups:
            config = pathway.config(group, column_layers[group])
            if cached is None or pathway.per_group:
                target = pathway.special or config
                cached = grafter.evaluate(prompts, target, k=k, batch_size=batch_size).summary()
                done += 1
                if progress:
                    progress(done, jobs)
            result.values[pathway.label][group] = cached
            result.configs[pathway.label][group] = pathway.special or config.describe()
    return result


def plot(result: SweepResult, path: str | Path, metric: str | None = None) -> Path:
    """A heatmap of the sweep (rows = configurations, columns = layer groups), values annotated."""
    import numpy as np

    from fv_remote.core.plots import _save, plt

    metric = metric or f"top{result.k}"
    data = np.array([[result.values[r][c][metric] for c in result.columns] for r in result.rows])
    fig, ax = plt.subplots(figsize=(1.3 * len(result.columns) + 4.5, 0.42 * len(result.rows) + 1.6))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(result.columns)))
    ax.set_xticklabels([f"{c}\n{layer_span(result.column_layers[c])}" for c in result.columns])
    ax.set_yticks(range(len(result.rows)))
    ax.set_yticklabels(result.rows)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center",
                    color="black" if data[i, j] > 0.6 else "white", fontsize=8)
    ax.set_title(f"grafting fine-tuned weights: {metric} accuracy ({result.n_prompts} held-out prompts)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, path)
