"""Composite vectors from a bank of vectors, computed where the model is (inside a remote session)."""

import torch


def bank_additions(mix, vectors, by_layer, add_layers, layers, scale: float):
    """[(layer envoy, [B, d_model] addition)] in forward order: row r adds scale * Σ_i mix[r, i] * vectors[i], each
    bank vector at its own layer (`by_layer`: layer -> bank indices). No mix (None): no additions."""
    if mix is None:
        return []
    return [(layers[at], scale * (mix[:, by_layer[at]] @ vectors[by_layer[at]])) for at in add_layers]


def mix_rows(kind: str, rows, weights, n_bank: int):
    """Bank weights per row: "eye" (row i = bank vector rows[i] alone), "weights" (the CFV weights of item rows[i]),
    "onehot" (its highest-weighted vector alone), "none" -> None."""
    if kind == "eye":
        return torch.eye(n_bank)[rows]
    if kind == "weights":
        return weights[rows]
    if kind == "onehot":
        return torch.nn.functional.one_hot(weights.argmax(-1), n_bank).float()[rows]
    return None


def combine_weights(logp, temperature: float, combine):
    """CFV weights from the relation profile logp [n, N]: softmax(logp / T), or through a learned combiner
    ({"weight", "bias", "t"}: softmax((logp / t) @ weight.T + bias))."""
    if combine is None:
        return torch.softmax(logp / temperature, dim=-1)
    return torch.softmax((logp / combine["t"]) @ combine["weight"].T + combine["bias"], dim=-1)


def row_scores(picked, targets, mask):
    """Per row from read logits [B, K, V]: (sum of log P(target) over the masked positions, whether every masked
    target is the argmax)."""
    logp = torch.log_softmax(picked, -1).gather(2, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(1), ((picked.argmax(-1) == targets) | ~mask).all(1)
