"""Attribution head scores: gradient x (mean clean - corrupted activation), all heads in one forward + backward.

A first-order estimate of the causal-mediation indirect effect (see `fv_remote.fv.cma`): for every head at once,
dP(answer)/dz . (mean - z) at the last token of a shuffled-label prompt. Results are stored like CMA results, in
the group `<task>/attribution` with the same variables, so the FV fitting can rank heads by either.

The prompt's prefix is run once without gradients (its keys/values cached); the forward + backward then covers the
last token only. That is exact: a change at the last token cannot reach earlier positions, so the gradient with
respect to the last token's head outputs only ever flows through the last position.
"""

from __future__ import annotations

import nnsight
import torch

from fv_remote.models.loading import LoadedModel
from fv_remote.traces.attribution import head_attribution
from fv_remote.traces.mediation import answer_prob


def attribution_prompt(model: LoadedModel, text: str, answer_id: int, means: torch.Tensor,
                       cached_prefix: bool = True) -> tuple[float, torch.Tensor]:
    """(P(answer | corrupted), attribution score per head [L * H] in `all_heads` order) for one prompt."""
    ad, lm = model.adapter, model.lm
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    n_tokens = ids.shape[1]
    if cached_prefix and n_tokens >= 2:
        with lm.trace(input_ids=ids[:, :-1], use_cache=True):
            cache = lm.output.past_key_values.save()
        inputs = dict(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True,
                      attention_mask=torch.ones(1, n_tokens, dtype=torch.long),
                      position_ids=torch.full((1, 1), n_tokens - 1, dtype=torch.long))
    else:
        inputs = dict(input_ids=ids)
    sites = [ad.head_site(lm, layer) for layer in range(ad.n_layers)]
    unembed = ad.unembed(lm)
    with torch.enable_grad():
        with lm.trace(**inputs):
            res = nnsight.save({})
            scores, _, p = head_attribution(sites, ad.layer(lm, 0), lambda: answer_prob(unembed.output, answer_id)[0],
                                            means, ad.n_heads, ad.head_dim)
            res["scores"], res["p"] = scores, p
    return float(res["p"]), res["scores"].detach().cpu().float().reshape(-1)
