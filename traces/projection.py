"""Projecting head outputs to the residual stream by calling the output projection itself (no weights read).

Remotely the weights stay on the server (and may be sharded or quantised there): calling the head-site module on a
vector that holds a head's mean in its own slot gives W_O[:, slot] @ mean plus the bias; the same call on zeros
gives the bias alone, which is subtracted (a function vector leaves the bias out).
"""

import torch


def project_heads(sites, heads, means, head_width: int, head_dim: int):
    """Residual-stream vectors [k, d_model] (float32) of head means.

    `sites[i]` is the head-site module of head i's layer, `heads[i]` its index in that layer and `means[i]` its
    mean output [head_dim]. Call inside a session (or trace) of the model the sites belong to.
    """
    rows = []
    for site, head, mean in zip(sites, heads, means):
        weight = site.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.bfloat16  # quantised weights
        x = torch.zeros(2, head_width, dtype=dtype, device=weight.device)
        x[0, head * head_dim:(head + 1) * head_dim] = mean.to(device=weight.device, dtype=dtype)
        y = site(x).float()
        rows.append(y[0] - y[1])
    return torch.stack(rows)


def project_rows(norm, unembed, rows, k: int, candidates):
    """Residual-stream vectors rows [n, 1, d_model] read through the final norm and the unembedding (both called
    directly): (top-k logits [n, k], their token ids [n, k], the 0-based vocabulary position of each `candidates`
    token [n, len(candidates)])."""
    weight = unembed.weight
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.bfloat16  # quantised weights
    logits = unembed(norm(rows.to(device=weight.device, dtype=dtype))).float()[:, 0]
    values, ids = torch.topk(logits, k, dim=-1)
    order = torch.argsort(logits, dim=-1, descending=True)
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return values, ids, position[:, candidates.to(position.device)]
