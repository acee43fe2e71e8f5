"""Figures people would rather look at than read: AIE heatmaps and layer sweeps (PNG, headless backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    """Atomically (temp file + rename): an interrupted run never leaves half a PNG."""
    from fv_remote.core.checks import atomic_save

    try:
        return atomic_save(lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"), Path(path), "plot")
    finally:
        plt.close(fig)


def aie_heatmap(aie, path: str | Path, title: str = "", top: list[tuple[int, int]] | None = None) -> Path:
    """Layer x head heatmap of average indirect effects; top heads outlined."""
    values = np.asarray(getattr(aie, "values", aie))
    n_layers, n_heads = values.shape
    fig, ax = plt.subplots(figsize=(max(4, n_heads * 0.5 + 2), max(4, n_layers * 0.22 + 1)))
    bound = float(np.abs(values).max()) or 1.0
    im = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", origin="lower")
    for layer, head in top or []:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_title(title or "average indirect effect")
    fig.colorbar(im, ax=ax, label="AIE (Δ P(answer))")
    return _save(fig, path)


def cma_heatmap(result, path: str | Path, model: str = "") -> Path:
    """The `cma` stage's heatmap of a `CMAResult` (the blocking command and `jobs fetch` write the same file)."""
    return aie_heatmap(result.aie, Path(path), title=f"{result.task}: AIE per head ({model})")


def layer_sweep_plot(curves: dict[str, dict[int, float]], path: str | Path, baselines: dict[str, float] | None = None,
                     title: str = "zero-shot accuracy with the FV added at each layer") -> Path:
    """One line per task: accuracy vs layer; dashed line = the task's accuracy without a vector."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, scores in curves.items():
        layers = sorted(scores)
        (line,) = ax.plot(layers, [scores[x] for x in layers], marker="o", ms=3, label=name)
        if baselines and name in baselines:
            ax.axhline(baselines[name], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
