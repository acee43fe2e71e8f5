"""Projecting vectors through the model's own modules, inside a trace, without reading a parameter.

Call these inside `with lm.trace(<any tiny input>):` (one invoke). Each first reads an activation, in forward order,
to learn the dtype and device the model computes in there, then calls the module ad hoc on the vector it built
(nnsight's logit-lens pattern: `envoy(x)` runs the module with the trace stood down). That is what NDIF's process
sandbox can serve: there the body runs in a runner process holding a weightless model, so `module.weight` fails and
a module call outside a trace has nothing to run on, while an ad-hoc call inside a trace is run by the host with the
real weights (which may be sharded or quantised; the activation's dtype is what the model computes in).

Head projection: calling the head site (the attention output projection) on a vector that holds a head's mean in
its own slot gives W_O[:, slot] @ mean plus the bias; the same call on zeros gives the bias alone, which is
subtracted (a function vector leaves the bias out).
"""

import torch


def project_heads(sites, layers, heads, means, head_width: int, head_dim: int):
    """Residual-stream vectors [k, d_model] (float32) of head means, in the order given.

    Head i sits in layer `layers[i]` (its head site `sites[i]`) at index `heads[i]`, with mean output `means[i]`
    [head_dim]. Layers are visited in forward order: each layer's head-site input is read once (its dtype and
    device), then the site is called once on all of that layer's heads plus a zero row.
    """
    rows = [None] * len(heads)
    for layer in sorted(set(layers)):
        members = [i for i in range(len(heads)) if layers[i] == layer]
        z = sites[members[0]].input
        x = torch.zeros(len(members) + 1, head_width, dtype=z.dtype, device=z.device)
        for row, i in enumerate(members):
            x[row, heads[i] * head_dim:(heads[i] + 1) * head_dim] = means[i].to(device=z.device, dtype=z.dtype)
        y = sites[members[0]](x).float()
        for row, i in enumerate(members):
            rows[i] = y[row] - y[-1]
    return torch.stack(rows)


def project_rows(norm, unembed, rows, k: int, candidates):
    """Residual-stream vectors rows [n, 1, d_model] read through the final norm and the unembedding (both called ad
    hoc, in the final norm input's dtype): (top-k logits [n, k], their token ids [n, k], the 0-based vocabulary
    position of each `candidates` token [n, len(candidates)])."""
    h = norm.input
    logits = unembed(norm(rows.to(device=h.device, dtype=h.dtype))).float()[:, 0]
    values, ids = torch.topk(logits, k, dim=-1)
    order = torch.argsort(logits, dim=-1, descending=True)
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return values, ids, position[:, candidates.to(position.device)]
