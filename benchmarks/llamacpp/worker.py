"""The llama.cpp side of benchmarks/llamacpp_check.py; runs in .venv-llamacpp (llama-cpp-python from PyPI), not in
the project's environment.

Loads the model GGUF, reads a control-vector GGUF the way llama.cpp's own loader does
(common/common.cpp `common_control_vector_load_one`: tensors `direction.<n>`, n >= 1, F32, 1-D; layer n's floats at
offset n_embd * (n - 1) of one buffer, times the strength of `--control-vector-scaled FILE STRENGTH`) and hands the
buffer to llama.cpp with `llama_set_adapter_cvec(ctx, data, len, n_embd, 1, n_layer)`, the call and the layer range
`common_init_from_params` makes for `--control-vector(-scaled)`. From there llama.cpp itself adds direction il to
the output of block il at every position (src/llama-adapter.cpp, `build_cvec` in src/models/llama.cpp).

Input JSON: {"prompts": [[token ids], ...]}; output JSON: per condition ("without", "with") the top-1 token id and
top-5 (id, logit) pairs of the last position of every prompt.

    python worker.py MODEL.gguf CVEC.gguf STRENGTH IN.json OUT.json
"""

from __future__ import annotations

import ctypes
import json
import sys

import gguf
import llama_cpp
import llama_cpp.llama_cpp
import numpy as np


def load_control_vector(path: str, strength: float) -> tuple[int, np.ndarray]:
    """(n_embd, buffer) as `common_control_vector_load_one` builds them."""
    reader = gguf.GGUFReader(path)
    n_embd, data = -1, np.zeros(0, dtype=np.float32)
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        layer = int(index) if prefix == "direction" and index.isdigit() else -1
        if layer <= 0:
            raise SystemExit(f"llama.cpp would refuse {tensor.name} in {path}")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise SystemExit(f"llama.cpp would refuse non-F32 {tensor.name}")
        values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        if n_embd == -1:
            n_embd = values.shape[0]
        elif values.shape[0] != n_embd:
            raise SystemExit("direction tensors differ in size")
        if data.shape[0] < n_embd * layer:
            data = np.concatenate([data, np.zeros(n_embd * layer - data.shape[0], dtype=np.float32)])
        data[n_embd * (layer - 1):n_embd * layer] += values * np.float32(strength)
    return n_embd, data


def last_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def run(llm: llama_cpp.Llama, prompts: list[list[int]]) -> list[dict]:
    rows = []
    for ids in prompts:
        logits = last_logits(llm, ids)
        top = np.argsort(-logits)[:5]
        rows.append({"top1": int(top[0]), "top5": [[int(i), float(logits[i])] for i in top]})
    return rows


def no_extra_buffer_types() -> None:
    """llama-cli's --no-repack (`use_extra_bufts = false`): the CPU's AMX/repack buffer types stay off. The machine
    this was built on advertises AMX, and llama.cpp's AMX path stopped there with an illegal instruction (a VM that
    lists AMX without enabling it); the plain CPU kernels (Q4_1 x Q8_1 dot products) run instead."""
    original = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama_cpp.llama_model_default_params = params


def main() -> None:
    model_path, cvec_path, strength, in_path, out_path = sys.argv[1:6]
    prompts = json.load(open(in_path))["prompts"]
    no_extra_buffer_types()
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=512, n_batch=512, n_threads=1, n_threads_batch=1,
                          logits_all=False, verbose=False)
    result = {"llama_cpp_python": llama_cpp.__version__, "n_layer": llama_cpp.llama_model_n_layer(llm.model),
              "n_embd": llama_cpp.llama_model_n_embd(llm.model), "without": run(llm, prompts)}
    n_embd, data = load_control_vector(cvec_path, float(strength))
    buf = (ctypes.c_float * data.shape[0])(*data.tolist())
    err = llama_cpp.llama_set_adapter_cvec(llm.ctx, buf, data.shape[0], n_embd, 1, result["n_layer"])
    if err:
        raise SystemExit(f"llama_set_adapter_cvec failed ({err})")
    result["with"] = run(llm, prompts)
    result["cvec_layers"] = sorted({int(i) // n_embd + 1 for i in np.flatnonzero(data)})
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main()
