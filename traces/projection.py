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

Post-norm families (Gemma 2/3, OLMo 2/3) put an RMSNorm between the attention output and the residual stream, so
the projected vector is then carried through that norm, linearised at the layer's mean attention output (see
ARCHITECTURE.md, "FV units"): the norm is called ad hoc as well, so still no parameter is read.
"""

import math

import torch


def linearised_norm(norm, u, anchor, dtype, eps: float = 0.0, radial: bool = False):
    """Vectors `u` [n, d_model] (float32) of attention-output space carried through a post-attention RMSNorm `norm`
    (called ad hoc) with its scale frozen at the attention output `anchor` [d_model]: g * u / sqrt(mean(anchor^2) +
    eps), g the norm's gain and eps its epsilon. Summed over all heads of a layer (plus the bias's share) this is
    norm(anchor) exactly.

    g * u is read by calling the norm on u scaled to RMS 1 (which it divides by sqrt(1 + eps)) and scaling back; the
    call runs in `dtype`, the model's compute dtype there.

    `radial=True` gives the norm's full Jacobian at `anchor` instead (the component of `u` along `anchor` removed
    first); no stage uses it (ARCHITECTURE.md, "FV units", says why).
    """
    anchor = anchor.float()
    r = (anchor.pow(2).mean() + eps).sqrt().clamp_min(1e-30)
    w = u.float()
    if radial:
        unit = anchor / anchor.norm().clamp_min(1e-30)
        w = w - (w @ unit).unsqueeze(-1) * unit
    s = w.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
    gained = norm((w / s).to(dtype)).float()
    return gained * (s * math.sqrt(1.0 + eps) / r)


def project_heads(sites, layers, heads, means, head_width: int, head_dim: int, norms=None, layer_means=None,
                  norm_eps: float = 0.0):
    """Residual-stream vectors [k, d_model] (float32) of head means, in the order given.

    Head i sits in layer `layers[i]` (its head site `sites[i]`) at index `heads[i]`, with mean output `means[i]`
    [head_dim]. Layers are visited in forward order: each layer's head-site input is read once (its dtype and
    device), then the site is called once on all of that layer's heads plus a zero row.

    Post-norm families pass `norms` (head i's post-attention norm, `norms[i]`) and `layer_means` [n, head_width],
    the mean output of *all* heads of each distinct layer, in increasing layer order: the same site call then also
    gives the mean attention output (bias included), at which the norm's scale is frozen (`linearised_norm`, with
    the norm's epsilon `norm_eps`).
    """
    rows = [None] * len(heads)
    for order, layer in enumerate(sorted(set(layers))):
        members = [i for i in range(len(heads)) if layers[i] == layer]
        z = sites[members[0]].input
        n = len(members)
        x = torch.zeros(n + (1 if norms is None else 2), head_width, dtype=z.dtype, device=z.device)
        for row, i in enumerate(members):
            x[row, heads[i] * head_dim:(heads[i] + 1) * head_dim] = means[i].to(device=z.device, dtype=z.dtype)
        if norms is not None:
            x[n] = layer_means[order].to(device=z.device, dtype=z.dtype)
        y = sites[members[0]](x)
        u = y[:n].float() - y[-1].float()
        if norms is not None:
            u = linearised_norm(norms[members[0]], u, y[n], y.dtype, norm_eps)
        for row, i in enumerate(members):
            rows[i] = u[row]
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
