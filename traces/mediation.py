"""Causal-mediation graphs: patch heads' mean activations into corrupted prompts at the last token.

Two layouts, both exact:

- rows as batch rows (`patch_rows`): row r of a batch gets its own patch, so one forward scores many patches;
- rows as *positions* (`patch_positions`): one batch row whose sequence holds R copies of the prompt's last
  token, all at the same position id, each attending to the shared cached prefix and to itself only (a 4D mask
  from `copies_mask`). Copy r gets its own patch. The prefix's keys/values are then shared by all copies instead of
  being repeated per row.
"""

import torch


def patch_rows(site, rows, heads, values, n_heads: int, head_dim: int):
    """In the batch at `site`, set head `heads[i]` of row `rows[i]` to `values[i]` at the last token (one op)."""
    z = site.input
    last = z[:, -1].view(z.shape[0], n_heads, head_dim)  # a view: writes reach the model
    last[rows, heads] = values.to(device=last.device, dtype=last.dtype)


def patch_positions(site, positions, heads, values, n_heads: int, head_dim: int):
    """In batch row 0 at `site`, set head `heads[i]` at sequence position `positions[i]` to `values[i]` (one op)."""
    z = site.input
    grid = z[0].view(z.shape[1], n_heads, head_dim)  # a view: writes reach the model
    grid[positions, heads] = values.to(device=grid.device, dtype=grid.dtype)


def copies_mask(n_cached: int, n_copies: int, dtype, hide=None, device=None):
    """4D mask [1, 1, R, n_cached + R] on `device`: copy r sees the cached keys (except index `hide`, if given) and
    itself.

    dtype torch.bool gives True = attend (SDPA); a float dtype gives an additive mask (0 / most negative), which
    every attention implementation accepts (eager adds it to the scores).
    """
    allowed = torch.zeros(n_copies, n_cached + n_copies, dtype=torch.bool, device=device)
    allowed[:, :n_cached] = True
    if hide is not None:
        allowed[:, hide] = False
    idx = torch.arange(n_copies, device=device)
    allowed[idx, n_cached + idx] = True
    allowed = allowed.view(1, 1, n_copies, n_cached + n_copies)
    if dtype == torch.bool:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def answer_prob(logits, answer_id: int):
    """P(answer) at the last token for every row ([B], its own storage: a view would carry the whole [B, vocab]
    softmax with it when saved and sent back)."""
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id].clone()


def answer_prob_positions(logits, answer_id: int):
    """P(answer) at every position of batch row 0 ([R]), without materialising the softmax."""
    row = logits[0].float()
    return torch.exp(row[:, answer_id] - torch.logsumexp(row, dim=-1))
