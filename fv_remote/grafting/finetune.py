"""Full fine-tuning of a causal LM on synthetic facts, saved as a local model folder with a manifest.

The folder holds the fine-tuned weights and tokenizer (loadable with `load_model(folder)`), the facts
(`facts.json`) and `graft.json`: the base model to graft into, the training settings, how long training took
and pretrained vs fine-tuned accuracy on held-out phrasings.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fv_remote.core.errors import UserError
from fv_remote.grafting.synthetic import SyntheticDataset, TrainSentence
from fv_remote.core.progress import Progress

MANIFEST = "graft.json"
FACTS = "facts.json"


@dataclass
class TrainSettings:
    epochs: int = 8
    lr: float = 2e-4
    batch_size: int = 16
    seed: int = 0
    loss_on: str = "all"  # "all" tokens of each sentence, or only the "object" tokens
    freeze_embeddings: bool = False
    warmup_frac: float = 0.05
    max_grad_norm: float = 1.0


@dataclass
class TrainReport:
    settings: dict[str, Any]
    n_sentences: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    step_losses: list[float] = field(default_factory=list)
    threads: int = 0


def collate(tokenizer: Any, sentences: Sequence[TrainSentence], loss_on: str = "all") -> dict[str, torch.Tensor]:
    """Right-padded batch with labels; -100 on padding (and, for loss_on='object', outside the object)."""
    if loss_on not in ("all", "object"):
        raise UserError(f"loss_on must be 'all' or 'object', got {loss_on!r}")
    rows = []
    for s in sentences:
        enc = tokenizer(s.text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if loss_on == "all":
            keep = [True] * len(ids)
        else:
            keep = [a < s.object_end and b > s.object_start for a, b in enc["offset_mapping"]]
        rows.append((ids, keep))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, keep) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(keep), torch.tensor(ids), torch.tensor(-100))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def finetune(hf: Any, tokenizer: Any, dataset: SyntheticDataset, settings: TrainSettings,
             progress: Progress | None = None) -> TrainReport:
    """Fine-tune `hf` in place (all parameters, or all but the embeddings) on the dataset's training sentences."""
    if settings.epochs <= 0 or settings.batch_size <= 0 or not settings.lr > 0:
        raise UserError("epochs, batch size and learning rate must be positive")
    sentences = dataset.train_sentences()
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    hf.requires_grad_(True)
    if settings.freeze_embeddings:
        hf.get_input_embeddings().requires_grad_(False)
        out_emb = hf.get_output_embeddings()
        if out_emb is not None:
            out_emb.requires_grad_(False)
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(sentences) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup_frac * total))

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    report = TrainReport(settings=asdict(settings), n_sentences=len(sentences), steps=total, seconds=0.0,
                         threads=torch.get_num_threads())
    hf.train()
    start = time.perf_counter()
    step = 0
    try:
        for _epoch in range(settings.epochs):
            order = list(range(len(sentences)))
            rng.shuffle(order)
            epoch_losses = []
            for b in range(0, len(order), settings.batch_size):
                batch = collate(tokenizer, [sentences[i] for i in order[b:b + settings.batch_size]], settings.loss_on)
                loss = hf(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                value = loss.detach().item()
                epoch_losses.append(value)
                report.step_losses.append(value)
                step += 1
                if progress:
                    progress(step, total)
            report.losses.append(sum(epoch_losses) / len(epoch_losses))
    finally:
        hf.eval()
        hf.requires_grad_(False)
        report.seconds = time.perf_counter() - start
    return report


def save_finetuned(hf: Any, tokenizer: Any, dataset: SyntheticDataset, out_dir: str | Path, base_model: str,
                   report: TrainReport | None = None, evaluation: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    dataset.save(out / FACTS)
    manifest = {"base_model": base_model, "facts": FACTS, "train": asdict(report) if report else None,
                "evaluation": evaluation or {}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{model_dir} is not a fine-tuned grafting folder (no {MANIFEST}); "
                        "make one with `fv-remote graft train --out DIR`")
    return json.loads(path.read_text())


def load_pair(model_dir: str | Path, base_model: str | None = None) -> tuple[Any, Any, SyntheticDataset, dict]:
    """(pretrained LoadedModel, fine-tuned LoadedModel, facts, manifest) for a folder made by `graft train`."""
    from fv_remote.models.loading import load_model

    manifest = read_manifest(model_dir)
    base = base_model or manifest.get("base_model")
    if not base:
        raise UserError(f"{model_dir}/{MANIFEST} names no base model; pass --base")
    pretrained = load_model(base)
    finetuned = load_model(str(model_dir))
    dataset = SyntheticDataset.load(Path(model_dir) / manifest.get("facts", FACTS))
    return pretrained, finetuned, dataset, manifest
