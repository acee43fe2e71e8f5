"""Steering: add a function vector at the last token, at one layer or distributed over its heads' own layers.

Used for scoring (top-1 next token, answer probability) and for generation. The vector touches only the
prompt's last token; generated tokens are not steered again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fv_remote.errors import UserError, require_positive
from fv_remote.models import LoadedModel
from fv_remote.traces.patching import add_to_head, add_to_residual
from fv_remote.vectors import FunctionVector


@dataclass
class Steer:
    """What to add: `vector` at `layer` (times `scale`), or with distributed=True each head's mean in its slot."""

    fv: FunctionVector
    layer: int | None = None
    scale: float = 1.0
    distributed: bool = False

    def resolved_layer(self, model: LoadedModel) -> int:
        return model.adapter.check_layer(self.fv.layer if self.layer is None else self.layer)


def _apply(model: LoadedModel, steer: Steer | None) -> None:
    """Called inside a trace, before anything downstream of the edited modules is read."""
    if steer is None:
        return
    ad, lm = model.adapter, model.lm
    if steer.distributed:
        if not steer.fv.heads or steer.fv.head_means is None:
            raise UserError(f"this {steer.fv.kind.upper()} has no per-head means; distributed steering needs an "
                            "FV built by `fv-remote fit`")
        order = sorted(range(len(steer.fv.heads)), key=lambda i: steer.fv.heads[i])  # forward order
        for i in order:
            layer, head = steer.fv.heads[i]
            add_to_head(ad.head_site(lm, layer), head, ad.head_dim, steer.scale * steer.fv.head_means[i])
    else:
        layer = steer.resolved_layer(model)
        add_to_residual(ad.layer(lm, layer), ad.spec.layer_output_is_tuple, steer.fv.vector, scale=steer.scale)


def last_logits(model: LoadedModel, texts: list[str], steer: Steer | None = None,
                batch_size: int = 16) -> torch.Tensor:
    """Last-token logits [N, vocab] (float32, CPU), batched with left padding."""
    require_positive("batch_size", batch_size)
    if steer is not None:
        steer.fv.check_model(model)
    ad, lm = model.adapter, model.lm
    chunks = []
    for start in range(0, len(texts), batch_size):
        with lm.trace(texts[start:start + batch_size]):
            _apply(model, steer)
            logits = ad.unembed(lm).output[:, -1].float().save()
        chunks.append(logits.detach().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, ad.vocab_size)


def top1_accuracy(model: LoadedModel, texts: list[str], answer_ids: list[int], steer: Steer | None = None,
                  batch_size: int = 16) -> float:
    if not texts:
        raise UserError("no prompts to evaluate")
    logits = last_logits(model, texts, steer, batch_size)
    return float((logits.argmax(-1) == torch.tensor(answer_ids)).float().mean())


def generate(model: LoadedModel, prompt: str, steer: Steer | None = None, max_new_tokens: int = 12) -> str:
    """Greedy continuation of `prompt` (only the new text), optionally steered at the prompt's last token."""
    require_positive("max_new_tokens", max_new_tokens)
    if steer is not None:
        steer.fv.check_model(model)
    lm = model.lm
    with lm.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False,
                     pad_token_id=model.tokenizer.pad_token_id) as tracer:
        _apply(model, steer)  # first step only: the prompt's tokens
        out = tracer.result.save()
    n_prompt = len(model.tokenizer(prompt).input_ids)
    return model.tokenizer.decode(out[0][n_prompt:], skip_special_tokens=True)
