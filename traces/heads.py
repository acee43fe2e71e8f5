"""Reading per-head outputs inside a trace.

A head's output is its slice of the attention output projection's *input* ([B, T, n_heads * head_dim]); the
projection then mixes heads into the residual stream. Called from inside `model.trace(...)`, in forward order.
"""

import torch


def split_heads(z, n_heads: int, head_dim: int):
    """[..., n_heads * head_dim] -> [..., n_heads, head_dim] (a view)."""
    return z.reshape(*z.shape[:-1], n_heads, head_dim)


def read_heads(sites, positions, n_heads: int, head_dim: int):
    """Head outputs at `positions` (negative = from the end) for every site -> [B, P, L, H, Dh], detached copy.

    `sites` are the head-site modules (one per layer, in layer order); with left padding, -1 is each row's last
    real token.
    """
    per_layer = []
    for site in sites:
        z = site.input[:, positions]
        per_layer.append(split_heads(z, n_heads, head_dim).detach().clone())
    return torch.stack(per_layer, dim=2)


def answer_stats(logits, answer_ids):
    """From last-token logits [B, V] and answer token ids [B]: (P(answer), top-1 token, log P(answer))."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ans_logp = logp.gather(1, answer_ids.view(-1, 1)).squeeze(1)
    return ans_logp.exp(), logits.argmax(dim=-1), ans_logp
