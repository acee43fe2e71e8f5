"""Causal-mediation graphs: patch heads' mean activations into corrupted prompts at the last token.

Row r of a batch gets its own patch, so one forward pass scores many (layer, head) patches at once.
"""

import torch


def patch_rows(site, rows, heads, values, n_heads: int, head_dim: int):
    """In the batch at `site`, set head `heads[i]` of row `rows[i]` to `values[i]` at the last token (one op)."""
    z = site.input
    last = z[:, -1].view(z.shape[0], n_heads, head_dim)  # a view: writes reach the model
    last[rows, heads] = values.to(last.dtype)


def answer_prob(logits, answer_id: int):
    """P(answer) at the last token for every row."""
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id]
