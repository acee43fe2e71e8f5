"""A JSON device map for benchmarks/gpu.sh: the first half of a cached model's blocks (and the embeddings) on the
GPU, the rest (and the head) offloaded to the CPU by accelerate. Usage: split_map.py MODEL DEVICE."""

import json
import sys

from transformers import AutoConfig

from fv_remote.models.loading import model_dir

name, device = sys.argv[1], sys.argv[2]
n = AutoConfig.from_pretrained(model_dir(name)).num_hidden_layers
gpu: object = int(device.split(":")[1]) if device.startswith("cuda:") else 0 if device == "cuda" else device
where = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "model.norm": "cpu", "lm_head": "cpu"}
where.update({f"model.layers.{i}": gpu if i < n // 2 else "cpu" for i in range(n)})
print(json.dumps(where))
