"""The geometry of a relation bank: cosine similarities, a hierarchical clustering, and class recovery.

`bank_map` computes the cosine-similarity matrix of the bank's vectors (optionally after subtracting the bank's
mean vector: FFVs trained from zero share a component that says "answer the query", which can dominate raw
cosines), orders it by agglomerative clustering (scipy, optimal leaf order; Ward's linkage on the unit vectors by
default, i.e. on √(2·cosine distance): average or single linkage tend to split off single outlying relations, so
a cut into k clusters says little about the rest),
and asks how well cutting that tree recovers the classes the sources give their relations (e.g. SemEval-2012's
10 classes over its 79 subcategories, BATS's 4 families): adjusted Rand index (ARI) between the clusters and the
classes, with a permutation baseline (the ARI of the same clusters against the class labels shuffled).

ARI is the Hubert & Arabie (1985) formula on the contingency table, written here with numpy (scikit-learn is not
a dependency of this project, and the formula is a few lines): ARI = (Σ C(n_ij,2) − E) / (½(Σ C(a_i,2) +
Σ C(b_j,2)) − E), E = Σ C(a_i,2) Σ C(b_j,2) / C(n,2); 1 for identical partitions, 0 in expectation for random ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fv_remote.relational.bank import RelationBank
from fv_remote.core.errors import UserError

LINKAGES = ("average", "complete", "single", "ward")


def adjusted_rand_index(labels_a, labels_b) -> float:
    """ARI between two partitions of the same items (any hashable labels)."""
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b):
        raise ValueError("the two labelings have different lengths")
    n = len(a)
    if n < 2:
        return 1.0
    _, ia = np.unique(np.asarray(a, dtype=object).astype(str), return_inverse=True)
    _, ib = np.unique(np.asarray(b, dtype=object).astype(str), return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)

    def pairs(x):
        x = np.asarray(x, dtype=np.float64)
        return float((x * (x - 1) / 2).sum())

    index = pairs(table)
    rows, cols = pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2)
    top = (rows + cols) / 2
    if top == expected:  # both partitions trivial (one cluster each, or all singletons)
        return 1.0
    return (index - expected) / (top - expected)


def cosine_matrix(vectors: np.ndarray, center: bool = False) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    if center:
        v = v - v.mean(0, keepdims=True)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UserError("a bank vector is zero (after centring): cosines are undefined; rebuild or drop it")
    u = v / norms
    return np.clip(u @ u.T, -1.0, 1.0)


def cluster_tree(sim: np.ndarray, method: str = "ward") -> np.ndarray:
    """scipy linkage matrix on cosine distance 1 − sim (ward: on the unit vectors' Euclidean distance)."""
    from scipy.cluster.hierarchy import linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    if method not in LINKAGES:
        raise UserError(f"unknown linkage {method!r}; use one of {', '.join(LINKAGES)}")
    dist = np.clip(1.0 - sim, 0.0, 2.0)
    if method == "ward":
        dist = np.sqrt(2.0 * dist)  # |u − v| for unit vectors
    np.fill_diagonal(dist, 0.0)
    condensed = squareform((dist + dist.T) / 2, checks=False)
    tree = linkage(condensed, method=method)
    return optimal_leaf_ordering(tree, condensed)


@dataclass
class Recovery:
    label: str
    source: str | None
    n: int
    n_classes: int
    ari: float
    perm_mean: float
    perm_q95: float
    p_value: float
    n_perm: int
    perm: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    clusters: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "source": self.source, "n": self.n, "n_classes": self.n_classes,
                "ari": self.ari, "perm_mean": self.perm_mean, "perm_q95": self.perm_q95, "p_value": self.p_value,
                "n_perm": self.n_perm, "clusters": self.clusters}


def class_recovery(names: list[str], sim: np.ndarray, classes: list[str], method: str = "ward",
                   n_perm: int = 1000, seed: int = 0, label: str = "class",
                   source: str | None = None) -> Recovery:
    """Cluster the given relations (their own sub-matrix) into as many clusters as there are classes; ARI against
    the classes and against `n_perm` shufflings of them (p = (1 + #{perm ≥ observed}) / (1 + n_perm))."""
    from scipy.cluster.hierarchy import fcluster

    k = len(set(classes))
    if len(names) < 3 or k < 2:
        raise UserError(f"class recovery needs at least 3 relations in at least 2 classes; got {len(names)} "
                        f"relations in {k} class(es)")
    clusters = fcluster(cluster_tree(sim, method), t=k, criterion="maxclust")
    ari = adjusted_rand_index(clusters, classes)
    rng = np.random.default_rng(seed)
    shuffled = np.array(classes, dtype=object)
    perm = np.empty(n_perm)
    for i in range(n_perm):
        perm[i] = adjusted_rand_index(clusters, rng.permutation(shuffled))
    p = (1 + int((perm >= ari - 1e-12).sum())) / (1 + n_perm)
    return Recovery(label, source, len(names), k, float(ari), float(perm.mean()), float(np.quantile(perm, 0.95)),
                    float(p), n_perm, perm, {n: int(c) for n, c in zip(names, clusters)})


@dataclass
class BankMap:
    names: list[str]
    sim: np.ndarray
    tree: np.ndarray
    order: list[int]
    labels: dict[str, list[str]]  # label key -> per entry
    recoveries: list[Recovery]
    center: bool
    method: str

    def as_json(self) -> dict[str, Any]:
        return {"n": len(self.names), "center": self.center, "linkage": self.method,
                "order": [self.names[i] for i in self.order], "names": self.names,
                "similarity": np.round(self.sim, 4).tolist(), "labels": self.labels,
                "recovery": [r.as_json() for r in self.recoveries],
                "mean_offdiagonal_cosine": float(self.sim[~np.eye(len(self.names), dtype=bool)].mean())
                if len(self.names) > 1 else None}


def bank_map(bank: RelationBank, label: str = "class", center: bool = False, method: str = "ward",
             n_perm: int = 1000, seed: int = 0) -> BankMap:
    """The whole bank's ordered similarity matrix, and class recovery per source whose entries carry `label`
    (each source's relations clustered on their own), plus over all labelled entries when sources differ."""
    from scipy.cluster.hierarchy import leaves_list

    bank.require_entries()
    if len(bank) < 3:
        raise UserError(f"a bank map needs at least 3 relations; this bank has {len(bank)}")
    names = bank.names
    sim = cosine_matrix(bank.vectors.numpy(), center)
    tree = cluster_tree(sim, method)
    order = leaves_list(tree).tolist()
    metas = [e.meta for e in bank.entries]
    labels = {key: [str(m.get(key, "")) for m in metas] for key in ("source", label)}
    recoveries = []
    sources = sorted({s for s in labels["source"] if s})
    for src in sources:
        idx = [i for i, m in enumerate(metas) if m.get("source") == src and m.get(label)]
        classes = [str(metas[i][label]) for i in idx]
        if len(idx) >= 3 and len(set(classes)) >= 2:
            recoveries.append(class_recovery([names[i] for i in idx], sim[np.ix_(idx, idx)], classes, method,
                                             n_perm, seed, label, src))
    if len(sources) > 1:  # which source a relation comes from, over the whole bank
        idx = [i for i, s in enumerate(labels["source"]) if s]
        recoveries.append(class_recovery([names[i] for i in idx], sim[np.ix_(idx, idx)],
                                         [labels["source"][i] for i in idx], method, n_perm, seed, "source", None))
    return BankMap(names, sim, tree, order, labels, recoveries, center, method)


def plot_map(result: BankMap, path: str | Path, title: str = "") -> Path:
    """Dendrogram over a heatmap of the ordered cosine matrix, with a colour strip per entry's class."""
    from matplotlib import colormaps
    from scipy.cluster.hierarchy import dendrogram

    from fv_remote.core.plots import _save, plt

    n = len(result.names)
    size = min(24, max(6, n * 0.12 + 3))
    fig = plt.figure(figsize=(size + 1.5, size + 2))
    grid = fig.add_gridspec(3, 2, height_ratios=[1.6, 0.25, size], width_ratios=[size, 0.3], hspace=0.02,
                            wspace=0.02)
    ax_tree = fig.add_subplot(grid[0, 0])
    dendrogram(result.tree, ax=ax_tree, no_labels=True, color_threshold=0, above_threshold_color="0.3")
    ax_tree.axis("off")
    classes = [result.labels["class" if "class" in result.labels else "source"][i] for i in result.order]
    kinds = sorted(set(classes))
    cmap = colormaps["tab20"]
    strip = np.array([[kinds.index(c) % 20 for c in classes]])
    ax_strip = fig.add_subplot(grid[1, 0])
    ax_strip.imshow(strip, cmap=cmap, vmin=0, vmax=19, aspect="auto", interpolation="nearest")
    ax_strip.set_xticks([])
    ax_strip.set_yticks([])
    ax = fig.add_subplot(grid[2, 0])
    ordered = result.sim[np.ix_(result.order, result.order)]
    im = ax.imshow(ordered, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest", aspect="auto")
    fontsize = max(3, min(8, 600 / max(n, 1)))
    ax.set_yticks(range(n), [result.names[i] for i in result.order], fontsize=fontsize)
    ax.set_xticks([])
    cax = fig.add_subplot(grid[2, 1])
    fig.colorbar(im, cax=cax, label="cosine" + (" (centred)" if result.center else ""))
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i % 20)) for i in range(len(kinds))]
    fig.legend(handles, kinds, loc="upper right", fontsize=7, ncol=2 if len(kinds) > 12 else 1, frameon=False)
    ax_tree.set_title(title or f"{n} relations, {result.method} linkage on cosine distance", loc="left")
    return _save(fig, path)


def plot_recovery(result: BankMap, path: str | Path) -> Path:
    """Per recovery: the permutation distribution of the ARI and the observed value."""
    from fv_remote.core.plots import _save, plt

    recs = result.recoveries
    if not recs:
        raise UserError("no class recovery to plot: no source's entries carry two or more classes")
    fig, axes = plt.subplots(1, len(recs), figsize=(3.6 * len(recs), 3), squeeze=False)
    for ax, r in zip(axes[0], recs):
        plural = r.label + ("es" if r.label.endswith("s") else "s")
        ax.hist(r.perm, bins=30, color="0.7", label=f"shuffled {plural} ({r.n_perm})")
        ax.axvline(r.ari, color="C3", lw=2, label=f"observed ARI {r.ari:.3f}")
        ax.axvline(r.perm_q95, color="0.3", ls="--", lw=1, label=f"95% of shuffles {r.perm_q95:.3f}")
        floor = r.p_value <= 1 / (1 + r.n_perm) + 1e-12  # no shuffle reached the observed ARI
        p_text = f"p ≤ 1/{r.n_perm + 1} (no shuffle reached it)" if floor else f"p = {r.p_value:.3g}"
        ax.set_title(f"{r.source or 'all sources'}: {r.n} relations, {r.n_classes} {plural}\n{p_text}", fontsize=9)
        ax.set_xlabel("adjusted Rand index")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
