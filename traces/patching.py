"""Writing into the forward pass inside a trace: set a head's output, add a vector to the residual stream.

Edits go through views of the live tensors so they reach the model (an edit to a copy would be silently lost).
"""

import torch


def set_head(site, head: int, head_dim: int, value, position: int = -1):
    """Overwrite one head's output (the head site's input slice) at `position` for every row."""
    z = site.input
    z[:, position, head * head_dim:(head + 1) * head_dim] = value


def layer_hidden(layer, output_is_tuple: bool):
    """The residual-stream tensor of a block's output: GPT-J returns (hidden, ...), other families a tensor.

    In transformers 5 `output[0]` on a tensor output would silently mean "batch row 0", hence the explicit flag.
    """
    out = layer.output
    return out[0] if output_is_tuple else out


def add_to_residual(layer, output_is_tuple: bool, vector, position: int = -1, scale: float = 1.0):
    """Add `scale * vector` ([d_model] or [B, d_model]) to a block's output at `position`."""
    hidden = layer_hidden(layer, output_is_tuple)
    hidden[:, position] += scale * vector.to(device=hidden.device, dtype=hidden.dtype)


def set_residual(layer, output_is_tuple: bool, vector, position: int = -1):
    """Replace a block's output at `position` with `vector` ([d_model]) in every row: a task vector is patched in
    (Hendel et al. 2023), not added."""
    hidden = layer_hidden(layer, output_is_tuple)
    hidden[:, position] = vector.to(device=hidden.device, dtype=hidden.dtype)


def read_residuals(layers, output_is_tuple: bool, position: int = -1):
    """The residual stream (each block's output) at `position` for `layers` (in forward order) -> [B, L, d_model],
    float32 copies."""
    return torch.stack([layer_hidden(layer, output_is_tuple)[:, position].detach().float() for layer in layers],
                       dim=1)


def add_to_head(site, head: int, head_dim: int, value, position: int = -1):
    """Add `value` to one head's output at `position` (distributed function vectors)."""
    z = site.input
    z[:, position, head * head_dim:(head + 1) * head_dim] += value.to(device=z.device, dtype=z.dtype)


def add_to_residual_everywhere(layer, output_is_tuple: bool, vector, scale: float = 1.0):
    """Add `scale * vector` ([d_model]) to a block's output at every position (a llama.cpp control vector's rule).

    In a generation step after the first only the new token passes through the block, so applied at every step this
    steers the prompt and every generated token. Left-padding positions get it too; attention masks them out.
    """
    hidden = layer_hidden(layer, output_is_tuple)
    hidden[:, :] += scale * vector.to(device=hidden.device, dtype=hidden.dtype)


def add_to_head_everywhere(site, head: int, head_dim: int, value):
    """Add `value` to one head's output at every position (distributed vectors with positions "all")."""
    z = site.input
    z[:, :, head * head_dim:(head + 1) * head_dim] += value.to(device=z.device, dtype=z.dtype)


def apply_edits(edits):
    """Apply a steering plan of plain tuples, in order (forward order is the caller's job):

    ("residual", layer, output_is_tuple, vector, scale) -> `add_to_residual`;
    ("head", site, head, head_dim, value) -> `add_to_head`;
    ("residual_all", layer, output_is_tuple, vector, scale) -> `add_to_residual_everywhere`;
    ("head_all", site, head, head_dim, value) -> `add_to_head_everywhere`;
    ("set_residual", layer, output_is_tuple, vector, scale) -> `set_residual` (scale unused: a patch is a patch).
    An empty plan leaves the forward pass alone.
    """
    for edit in edits:
        if edit[0] == "set_residual":
            set_residual(edit[1], edit[2], edit[3])
        elif edit[0] == "residual":
            add_to_residual(edit[1], edit[2], edit[3], scale=edit[4])
        elif edit[0] == "residual_all":
            add_to_residual_everywhere(edit[1], edit[2], edit[3], scale=edit[4])
        elif edit[0] == "head_all":
            add_to_head_everywhere(edit[1], edit[2], edit[3], edit[4])
        else:
            add_to_head(edit[1], edit[2], edit[3], edit[4])


def last_token_value(logits, top1: bool):
    """What a scoring trace sends back from last-token logits [B, V]: the top-1 ids [B], or float32 logits."""
    return logits.argmax(dim=-1) if top1 else logits.float()


def top_probs(logits, k: int):
    """The `k` most probable next tokens of float logits [B, V]: (probabilities [B, k], ids [B, k]) on the CPU."""
    top = torch.softmax(logits.float(), dim=-1).topk(k)
    return top.values.detach().cpu(), top.indices.cpu()


def add_at_positions(layer, output_is_tuple: bool, vectors, positions):
    """Add row r of `vectors` [B, d_model] to a block's output at row r's (negative) position `positions[r]`."""
    hidden = layer_hidden(layer, output_is_tuple)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    hidden[rows, hidden.shape[1] + positions.to(hidden.device)] += vectors.to(device=hidden.device, dtype=hidden.dtype)


def read_positions(logits, read):
    """float32 logits [B, K, vocab] at each row's (negative) positions `read` [B, K]."""
    rows = torch.arange(logits.shape[0], device=logits.device).view(-1, 1)
    return logits[rows, logits.shape[1] + read.to(logits.device)].float()
