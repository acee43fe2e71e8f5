"""Train/test overlap: which evaluated word pairs a bank entry (or an FFV) was trained on.

Many public relation sets reuse SemEval-2012 or BATS pairs, so a similarity or analogy score measured on pairs a
vector was fitted to is inflated, and nothing in the score says so. Every FFV therefore records the pairs that
shaped it in `meta["trained_pairs"]` (`record`): its training pairs and its validation pairs (the validation loss
chose the kept step, so they shaped it too), as short hashes. A bank entry copies the record of its FFV. `align`
and `analogy` count the evaluated items that share a pair with any entry's record (`find_overlap`), and with
`--exclude-trained` score each such item again without the entries it shares a pair with.

- **Hash**: the first 16 hex digits (64 bits) of SHA-256 of `"a\\tb"`, each word normalised by `normalise`: Unicode
  NFKC, runs of whitespace to one space, stripped, lower-cased. So "Hot" / " hot " / "HOT" are one word; a record
  is ~19 bytes a pair and says which pairs were used without storing the data set's text.
- **Pair order**: the record keeps each pair as trained, (a, b); a lookup matches (a, b) and (b, a). For symmetric
  relations (antonyms, synonyms) the reversed pair is the same fact, and for the others the vector was still trained
  on the two words together: counting a reversed pair as overlap can only over-report a leak, never hide one.
- **No record** (banks and FFVs from before this record): the entry's overlap is *unknown*, never 0. An overlap with
  some entries unknown is a lower bound ("partial"); with every entry unknown there is no count at all.

Why `--exclude-trained` leaves entries out *per item* and not out of the whole bank: an entry's test-split pairs are
exactly what shows whether it generalises beyond what it was fitted to, and dropping a SemEval relation for every
item because one item reused its training pair would measure a bank without that relation, a different question.
Per item, the excluded entries get no weight (their log-probs are masked before the softmax); the other entries and
every other item are untouched. An item that shares a pair with every entry has no bank left: in `analogy` its CFV is
the zero vector (scored as with no vector, so the two figures stay on the same items), in `align` its similarity is
undefined and the row is left out of that figure; both count them.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fv_remote.core.errors import UserError

META_KEY = "trained_pairs"
SCHEME = "sha256/16: NFKC, whitespace collapsed, stripped, lower-cased; 'a\\tb'"
HASH_CHARS = 16
_SPACE = re.compile(r"\s+")
_HEX = re.compile(r"^[0-9a-f]+$")

Pair = tuple[str, str]


class _Entry(Protocol):
    name: str
    meta: dict[str, Any]


class _Bank(Protocol):
    """What this module reads of a `relational.bank.RelationBank` (not imported: the bank imports this module)."""

    @property
    def entries(self) -> Sequence[_Entry]: ...

    @property
    def names(self) -> list[str]: ...


def normalise(word: str) -> str:
    """A word as the hash sees it: NFKC, whitespace runs to one space, stripped, lower-cased."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", str(word))).strip().lower()


def pair_hash(a: str, b: str) -> str:
    """The stable short hash of the ordered pair (a, b) (`SCHEME`)."""
    text = f"{normalise(a)}\t{normalise(b)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_CHARS]


def record(train: Iterable[Sequence[str]], valid: Iterable[Sequence[str]] = ()) -> dict[str, Any]:
    """What an FFV stores in `meta["trained_pairs"]`: the hashes of its training and validation pairs."""
    return {"scheme": SCHEME, "train": [pair_hash(a, b) for a, b in train],
            "valid": [pair_hash(a, b) for a, b in valid]}


def examples_record(train: Any, valid: Any = None) -> dict[str, Any] | None:
    """`record` of the pairs behind fine-tuning prompts (`ffv_plan.Examples` with their `pairs`), or None when
    they are not known (prompts made by hand): no record rather than a wrong one."""
    sets = [x for x in (train, valid) if x is not None and len(x)]
    if not sets or any(len(x.pairs) != len(x) for x in sets):
        return None
    return record(train.pairs, valid.pairs if valid is not None else ())


def trained_hashes(meta: Mapping[str, Any] | None, name: str = "") -> frozenset[str] | None:
    """The hashes an FFV's or bank entry's metadata records, or None when it records none (older files).

    A record that is there but not ours (another scheme, non-hex hashes) is a UserError naming the entry: reading
    it as "no overlap" would be the silent 0 this module exists to prevent."""
    rec = (meta or {}).get(META_KEY)
    if rec is None:
        return None
    what = f"bank entry {name!r}" if name else "the vector"
    if not isinstance(rec, Mapping) or rec.get("scheme") != SCHEME:
        found = rec.get("scheme") if isinstance(rec, Mapping) else type(rec).__name__
        raise UserError(f"{what}: its {META_KEY} record is not one this version reads (scheme {found!r}); "
                        "rebuild the bank (or re-run finetune) to record it again")
    hashes = [*rec.get("train", []), *rec.get("valid", [])]
    if not all(isinstance(h, str) and len(h) == HASH_CHARS and _HEX.match(h) for h in hashes):
        raise UserError(f"{what}: its {META_KEY} record is damaged (a hash is not {HASH_CHARS} hex digits); "
                        "rebuild the bank (or re-run finetune) to record it again")
    return frozenset(hashes)


def n_recorded(meta: Mapping[str, Any] | None) -> int | None:
    """How many pairs a record holds (training + validation), None without one (`bank info`)."""
    rec = (meta or {}).get(META_KEY)
    if not isinstance(rec, Mapping):
        return None
    return len(rec.get("train", [])) + len(rec.get("valid", []))


@dataclass
class Overlap:
    """Which evaluated items share a pair with which bank entries' recorded training pairs.

    `hits[i]`: indices of the entries item i shares a pair with (among entries with a record); `unknown`: names of
    the entries without a record."""

    names: list[str]
    hits: list[list[int]]
    unknown: list[str] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return len(self.hits)

    @property
    def status(self) -> str:
        """"known" (every entry has a record), "partial" (some have none: the count is a lower bound), "unknown"."""
        if not self.unknown:
            return "known"
        return "unknown" if len(self.unknown) == len(self.names) else "partial"

    @property
    def n_overlapping(self) -> int | None:
        """Items sharing a pair with at least one entry's record; None when no entry has a record."""
        if self.status == "unknown":
            return None
        return sum(1 for h in self.hits if h)

    def entries(self) -> dict[str, int]:
        """Entry name -> how many items share a pair with its record (entries with none left out)."""
        counts: dict[str, int] = {}
        for h in self.hits:
            for j in h:
                counts[self.names[j]] = counts.get(self.names[j], 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def mask(self) -> torch.Tensor:
        """[n_items, n_entries] bool: True where an item shares a pair with an entry (what --exclude-trained drops)."""
        out = torch.zeros(self.n_items, len(self.names), dtype=torch.bool)
        for i, h in enumerate(self.hits):
            out[i, h] = True
        return out

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "n_items": self.n_items, "n_overlapping": self.n_overlapping,
                "n_entries_involved": len(self.entries()), "entries": self.entries(),
                "unknown_entries": list(self.unknown), "pair_order": "either", "scheme": SCHEME}

    def describe(self, items: str = "items") -> str:
        """One line for the terminal."""
        if self.status == "unknown":
            return (f"train/test overlap: UNKNOWN: none of the bank's {len(self.names)} entries records its training "
                    "pairs (built before fv-remote recorded them); rebuild the bank to know")
        involved = self.entries()
        top = ", ".join(f"{name} ({n})" for name, n in list(involved.items())[:5])
        more = f", ... ({len(involved) - 5} more)" if len(involved) > 5 else ""
        line = (f"train/test overlap: {'at least ' if self.status == 'partial' else ''}{self.n_overlapping} of "
                f"{self.n_items} {items} share a word pair (either order) with the training pairs of "
                f"{len(involved)} of {len(self.names)} bank entries" + (f": {top}{more}" if involved else ""))
        if self.status == "partial":
            line += (f"; {len(self.unknown)} entries record no training pairs (unknown overlap): "
                     f"{', '.join(self.unknown[:5])}{', ...' if len(self.unknown) > 5 else ''}")
        return line


def entry_hashes(bank: _Bank) -> list[frozenset[str] | None]:
    """Per bank entry, its recorded hashes (None without a record)."""
    return [trained_hashes(e.meta, e.name) for e in bank.entries]


def find_overlap(bank: _Bank, items: Sequence[Iterable[Sequence[str]]]) -> Overlap:
    """Per item (its word pairs), the bank entries whose record holds one of its pairs, in either order."""
    per_entry = entry_hashes(bank)
    hits = []
    for pairs in items:
        mine = {h for a, b in pairs for h in (pair_hash(a, b), pair_hash(b, a))}
        hits.append([j for j, hashes in enumerate(per_entry) if hashes is not None and mine & hashes])
    unknown = [e.name for e, hashes in zip(bank.entries, per_entry) if hashes is None]
    return Overlap(list(bank.names), hits, unknown)


def require_known(overlap: Overlap, option: str = "--exclude-trained") -> None:
    """Refuse an exclusion that could not exclude anything because no entry records its pairs."""
    if overlap.status == "unknown":
        raise UserError(f"{option}: none of the bank's {len(overlap.names)} entries records its training pairs "
                        "(the bank was built before fv-remote recorded them), so nothing can be left out; rebuild "
                        "the bank with `fv-remote bank build` (or leave the option out: the overlap is then "
                        "reported as unknown)")
