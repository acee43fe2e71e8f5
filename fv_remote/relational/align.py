"""Human alignment: does the model's relation similarity between two word pairs track people's ratings?

Input: a CSV with one row per (pair 1, pair 2, rating); column names configurable (default
pair1_word1,pair1_word2,pair2_word1,pair2_word2,mean_rating). Each word pair gets a relation representation from
the bank: its profile log P(B | A, FFV_i) over the bank, turned into CFV weights (softmax, temperature T).

Similarity methods:
- "weights": cosine between the two pairs' CFV weight profiles (default);
- "cfv": cosine between the two composite vectors Σ w_i FFV_i;
- "logp": Pearson correlation of the two raw log-prob profiles;
- "bank": cosine between the two pairs' top bank vectors (each pair read as its single best relation).

Spearman ρ between model similarity and rating, with a percentile bootstrap 95% interval over rows.

Train/test overlap (`relational.overlap`): every run counts the rows whose pair 1 or pair 2 (either order) is among
a bank entry's recorded training/validation pairs. With `exclude_trained` each such row is scored again with those
entries left out of both pairs' profiles (per row, not out of the whole bank: the entry still represents the rows
drawn from pairs it was not trained on), and ρ is given with and without them, plus ρ on the rows that share no
pair at all. All three come from one profile computation.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fv_remote.relational.analogy import AnalogySettings, cfv_weights, composite_vector, relation_profile
from fv_remote.relational.bank import RelationBank
from fv_remote.data import answer_first_token
from fv_remote.data.formats import read_text_file
from fv_remote.core.errors import UserError, did_you_mean
from fv_remote.models.loading import LoadedModel
from fv_remote.relational.overlap import Overlap, find_overlap, require_known

DEFAULT_COLUMNS = ("pair1_word1", "pair1_word2", "pair2_word1", "pair2_word2", "mean_rating")
METHODS = ("weights", "cfv", "logp", "bank")


@dataclass
class RatingRow:
    pair1: tuple[str, str]
    pair2: tuple[str, str]
    rating: float
    line: int


def parse_columns(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Five column names, comma-separated, in the order pair1_word1,pair1_word2,pair2_word1,pair2_word2,rating."""
    if text is None:
        return DEFAULT_COLUMNS
    names = tuple(c.strip() for c in (text.split(",") if isinstance(text, str) else text))
    if len(names) != 5 or not all(names):
        raise UserError(f"--columns takes 5 comma-separated names (pair 1 word 1, pair 1 word 2, pair 2 word 1, "
                        f"pair 2 word 2, rating), got {text!r}")
    return names


def read_ratings(path: str | Path, columns: Sequence[str] = DEFAULT_COLUMNS) -> list[RatingRow]:
    """Rows of a ratings CSV; a missing column is named in the error, with the header that is there."""
    path, text = read_text_file(path, "utf-8-sig")  # a BOM (spreadsheet exports) is not part of the header
    reader = csv.DictReader(text.splitlines())
    try:
        return _read_rating_rows(path, reader, columns)
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None


def _read_rating_rows(path: Path, reader: csv.DictReader, columns: Sequence[str]) -> list[RatingRow]:
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in columns if c not in header]
    if missing:
        hints = "".join(did_you_mean(m, header) for m in missing[:1])
        raise UserError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}{hints}; "
                        f"the header has: {', '.join(header) or '(nothing)'}. Name the columns with --columns "
                        "PAIR1_WORD1,PAIR1_WORD2,PAIR2_WORD1,PAIR2_WORD2,RATING")
    rows = []
    for row in reader:
        line = reader.line_num
        cells = [(row.get(c) or "").strip() for c in columns]
        if not any(cells):
            continue
        if not all(cells[:4]):
            raise UserError(f"{path}:{line}: empty word in {cells[:4]}")
        try:
            rating = float(cells[4])
        except ValueError:
            raise UserError(f"{path}:{line}: rating {cells[4]!r} in column {columns[4]!r} is not a number") from None
        if not np.isfinite(rating):
            raise UserError(f"{path}:{line}: rating {cells[4]!r} in column {columns[4]!r} is not a finite number "
                            "(NaN/inf would make Spearman's rho undefined); drop the row or give a value")
        rows.append(RatingRow((cells[0], cells[1]), (cells[2], cells[3]), rating, line))
    if not rows:
        raise UserError(f"{path}: no ratings")
    return rows


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    xa, ya = np.asarray(x, float), np.asarray(y, float)
    if len(xa) < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return float("nan")
    return float(spearmanr(xa, ya).statistic)


def spearman_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> tuple[float, list[float]]:
    """ρ and its percentile bootstrap interval (rows resampled with replacement; degenerate resamples dropped)."""
    from scipy.stats import rankdata

    xa, ya = np.asarray(x, float), np.asarray(y, float)
    rho = spearman(x, y)
    if not np.isfinite(rho):
        return rho, [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(xa), size=(n_boot, len(xa)))
    rx, ry = np.apply_along_axis(rankdata, 1, xa[idx]), np.apply_along_axis(rankdata, 1, ya[idx])
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    denom = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    ok = denom > 0
    if not ok.any():
        return rho, [float("nan"), float("nan")]
    rhos = (rx * ry).sum(1)[ok] / denom[ok]
    lo, hi = np.quantile(rhos, [(1 - level) / 2, 1 - (1 - level) / 2])
    return rho, [float(lo), float(hi)]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def similarities(bank: RelationBank, logp1: torch.Tensor, logp2: torch.Tensor, method: str,
                 temperature: float = 1.0, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Model relation similarity per row from the two pairs' log-prob profiles [n, N]; `exclude` [n, N] (bool)
    leaves entries out of a row (no weight in either profile; "logp": the correlation over the other entries)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}{did_you_mean(method, METHODS)}; use one of {', '.join(METHODS)}")
    if method == "logp":
        if exclude is None:
            a, b = logp1 - logp1.mean(-1, keepdim=True), logp2 - logp2.mean(-1, keepdim=True)
            return _cos(a, b)
        keep = (~exclude).float()

        def centred(x: torch.Tensor) -> torch.Tensor:  # over the kept entries only, zero at the others
            return (x - (x * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True)) * keep

        return _cos(centred(logp1), centred(logp2))
    if exclude is not None:
        logp1, logp2 = logp1.masked_fill(exclude, float("-inf")), logp2.masked_fill(exclude, float("-inf"))
    w1, w2 = cfv_weights(logp1, temperature), cfv_weights(logp2, temperature)
    if method == "weights":
        return _cos(w1, w2)
    vectors = bank.vectors
    if method == "bank":
        return _cos(vectors[w1.argmax(-1)], vectors[w2.argmax(-1)])

    def flat(w: torch.Tensor) -> torch.Tensor:  # a CFV spread over layers, concatenated in layer order
        return torch.stack([torch.cat([v for _, v in sorted(composite_vector(bank, row).items())]) for row in w])

    return _cos(flat(w1), flat(w2))


@dataclass
class AlignResult:
    spearman: float
    ci95: list[float]
    n_used: int
    n_skipped: int
    method: str
    model_sim: list[float] = field(default_factory=list)
    ratings: list[float] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    overlap: Overlap | None = None  # rows sharing a pair with the bank's recorded training pairs
    excluded: dict[str, Any] | None = None  # with exclude_trained: rho without the overlapping entries (per row)
    clean: dict[str, Any] | None = None  # with exclude_trained: rho on the rows that share no pair

    def undefined(self) -> str | None:
        """Why ρ is NaN (constant ratings or similarities), None when it is a number."""
        if np.isfinite(self.spearman):
            return None
        if len(self.ratings) and np.ptp(self.ratings) == 0:
            return "the ratings are all equal"
        if len(self.model_sim) and np.ptp(self.model_sim) == 0:
            return f"the model similarities ({self.method}) are all equal"
        return "the similarities are not finite"

    def as_json(self) -> dict[str, Any]:
        data = {"spearman": self.spearman, "ci95": self.ci95, "n_used": self.n_used, "n_skipped": self.n_skipped,
                "method": self.method, "overlap": self.overlap.as_json() if self.overlap else None}
        if self.excluded is not None:
            data["excluded_trained"] = self.excluded
            data["no_overlap_rows"] = self.clean
        return data


def align(model: LoadedModel, bank: RelationBank, rows: Sequence[RatingRow], method: str = "weights",
          temperature: float = 1.0, n_boot: int = 1000, seed: int = 0, settings: AnalogySettings | None = None,
          progress=None, exclude_trained: bool = False) -> AlignResult:
    """Spearman ρ of the model's relation similarity against the ratings; the train/test overlap always, and with
    `exclude_trained` ρ without the overlapping entries (per row) and on the rows without overlap (module doc)."""
    s = settings or AnalogySettings(temperature=temperature)
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}{did_you_mean(method, METHODS)}; use one of {', '.join(METHODS)}")
    bank.require_entries()
    bank.check_model(model)
    used, skipped = [], []
    for row in rows:
        bad = [w for _, w in (row.pair1, row.pair2) if answer_first_token(model.tokenizer, w, s.template) is None]
        if bad:
            skipped.append((row.line, f"{bad[0]!r} has no usable first token after the query"))
        else:
            used.append(row)
    if len(used) < 3:
        raise UserError(f"only {len(used)} usable rows ({len(skipped)} skipped); Spearman needs at least 3")
    overlap = find_overlap(bank, [(r.pair1, r.pair2) for r in used])
    if exclude_trained:
        require_known(overlap)  # before the profiles: nothing could be left out
    pairs = sorted({p for r in used for p in (r.pair1, r.pair2)})
    profile = relation_profile(model, bank, pairs, s, progress)
    index = {p: i for i, p in enumerate(pairs)}
    logp1 = profile[[index[r.pair1] for r in used]]
    logp2 = profile[[index[r.pair2] for r in used]]
    sims = similarities(bank, logp1, logp2, method, temperature).tolist()
    ratings = [r.rating for r in used]
    rho, ci = spearman_ci(sims, ratings, n_boot, seed)
    result = AlignResult(rho, ci, len(used), len(skipped), method, sims, ratings, skipped, overlap)
    if exclude_trained:
        mask = overlap.mask()
        left = [i for i in range(len(used)) if not bool(mask[i].all())]  # rows with an entry left
        sims_ex = similarities(bank, logp1[left], logp2[left], method, temperature, mask[left]).tolist()
        result.excluded = _figure(sims_ex, [ratings[i] for i in left], n_boot, seed)
        result.excluded["n_no_entry_left"] = len(used) - len(left)
        clean = [i for i, hits in enumerate(overlap.hits) if not hits]
        result.clean = _figure([sims[i] for i in clean], [ratings[i] for i in clean], n_boot, seed)
    return result


def _figure(sims: Sequence[float], ratings: Sequence[float], n_boot: int, seed: int) -> dict[str, Any]:
    """ρ, its interval and the row count of some rows (ρ is NaN under 3 rows or constant values)."""
    rho, ci = spearman_ci(sims, ratings, n_boot, seed) if len(sims) else (float("nan"), [float("nan")] * 2)
    return {"spearman": rho, "ci95": ci, "n_used": len(sims)}


def scatter(result: AlignResult, path: str | Path, title: str = "") -> Path:
    from fv_remote.core.plots import _save, plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(result.ratings, result.model_sim, s=12, alpha=0.7)
    ax.set_xlabel("human rating")
    ax.set_ylabel(f"model similarity ({result.method})")
    lo, hi = result.ci95
    ax.set_title(title or f"Spearman ρ = {result.spearman:.3f} [{lo:.3f}, {hi:.3f}], n = {result.n_used}")
    return _save(fig, path)
