"""||FV|| / ||residual stream at the FV's layer|| for saved FV files (the numbers in benchmarks/RESULTS.md, issue 13).

The residual stream is the output of block `fv.layer` (where the FV is added) at the last token of the task's
zero-shot test prompts (the prompts the FV is evaluated on), as its mean L2 norm over up to N prompts. For post-norm
families it also prints, per head, the size of the norm's first-order rescaling term relative to the head vector
(ARCHITECTURE.md, "FV units").

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fv_norm_ratio.py --model gemma3-270m --fv-dir out/gemma6 \
        --data-dir ../shared/data/todd_fv/abstractive
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def residual_norm(model, texts: list[str], layer: int, batch: int = 16) -> float:
    from fv_remote.traces.patching import layer_hidden

    ad, lm = model.adapter, model.lm
    norms = []
    for start in range(0, len(texts), batch):
        with lm.trace(texts[start:start + batch]):
            value = layer_hidden(ad.layer(lm, layer), ad.layer_output_is_tuple)[:, -1].norm(dim=-1).save()
        norms.extend(float(x) for x in value)
    return sum(norms) / len(norms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--fv-dir", required=True, help="folder with <task>.fv.safetensors files (fv-remote run --out)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--n", type=int, default=50, help="zero-shot test prompts to average over")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from fv_remote.data import load_task
    from fv_remote.models.loading import load_model
    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.vectors import FunctionVector

    model = load_model(args.model)
    ad = model.adapter
    rows = []
    for path in sorted(Path(args.fv_dir).glob("*.fv.safetensors")):
        fv = FunctionVector.load(path)
        prepared = prepare_task(model.tokenizer, load_task(fv.task, args.data_dir), seed=0, min_pairs=12)
        n = min(args.n, len(prepared.splits.test))
        texts = [p.text for p in prepared.prompts("test", n, kind="zero_shot", n_shots=0, seed_offset=2)]
        resid = residual_norm(model, texts, fv.layer)
        row = {"task": fv.task, "layer": fv.layer, "fv_norm": float(fv.vector.norm()), "residual_norm": resid,
               "ratio": float(fv.vector.norm()) / resid, "n_prompts": n}
        if ad.has_post_attn_norm and fv.head_vectors is not None and fv.head_means is not None:
            shares = rescaling_shares(model, fv)
            if shares:
                row["rescaling_share"] = [round(x, 3) for x in shares]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.model_id, "rows": rows}, indent=1))


def rescaling_shares(model, fv) -> list[float]:
    """Per head of the FV: |s_h N(a)| / |v_h|, the size of the norm's first-order rescaling term (which the FV leaves
    out) relative to the head vector; needs all heads' means, from the run's store (`fv.meta["store"]`)."""
    import torch

    from fv_remote.fv.extract import mean_heads_tensor
    from fv_remote.store.activations import ActivationStore

    url = fv.meta.get("store")
    if not url or not Path(url).exists():
        return []
    means = mean_heads_tensor(ActivationStore(url), fv.task)
    ad, out = model.adapter, []
    for (layer, head), vec in zip(fv.heads, fv.head_vectors):
        site, norm = ad.head_site(model.hf, layer), ad.post_attn_norm(model.hf, layer)
        slot = torch.zeros(1, ad.head_width)
        slot[0, head * ad.head_dim:(head + 1) * ad.head_dim] = means[layer, head]
        with torch.no_grad():
            anchor = site(means[layer].reshape(1, -1))[0]
            u = site(slot)[0] - site(torch.zeros(1, ad.head_width))[0]
            share = (anchor @ u) / (anchor @ anchor + ad.d_model * ad.norm_eps)
            out.append(float((share * norm(anchor.view(1, -1))[0]).norm() / vec.norm()))
    return out


if __name__ == "__main__":
    main()
