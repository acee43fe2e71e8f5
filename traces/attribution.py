"""Attribution graphs: first-order (gradient x activation difference) estimates of every head's indirect effect.

For a corrupted prompt, head (l, h) with last-token output z and mean clean output m, the estimate of
P(answer | z := m) - P(answer | corrupted) is  dP/dz . (m - z).  One forward and one backward give it for all heads.
Runs inside a trace; imports only torch (NDIF's sandbox).
"""

import torch


def head_attribution(sites, first_layer, metric, means, n_heads: int, head_dim: int):
    """Inside a trace: [L, H] attribution scores at the last token, and the last-token head outputs [L, H, Dh].

    `sites` are the head-site envoys in layer order (their inputs are the per-head outputs); `first_layer` is the
    first decoder layer's envoy, whose input is made to require gradients (the model itself stays frozen) so
    autograd tracks every head output. `metric` is a callable from the final logits to a scalar (e.g. P(answer)).
    Envoys are touched in forward order; gradients are read in reverse (nnsight's backward order).
    """
    first_layer.input.requires_grad_(True)
    live = [site.input for site in sites]
    acts = torch.stack([z[0, -1].detach().view(n_heads, head_dim) for z in live])
    value = metric()
    grads = [None] * len(live)
    with value.backward():
        for layer in range(len(live) - 1, -1, -1):
            grads[layer] = live[layer].grad[0, -1].detach().view(n_heads, head_dim)
    grad = torch.stack(grads)
    scores = (grad * (means.to(device=grad.device, dtype=grad.dtype) - acts)).sum(-1)
    return scores, acts, value.detach()
