"""The whole FV pipeline on meta-llama/Llama-3.1-70B, run remotely on NDIF (https://ndif.us).

Nothing but the model's config and tokenizer is downloaded: the client builds a weightless (meta-device) copy of the
architecture and every stage is ONE NDIF request whose results come back as small CPU tensors.

What you need (the script checks each and says which is missing):
  1. an NDIF API key (https://login.ndif.us):  export NDIF_API_KEY=...   (or `nnsight login`)
  2. access to the gated repo meta-llama/Llama-3.1-70B on the Hugging Face Hub (accept its licence, then
     `huggingface-cli login` or HF_TOKEN) -- only its config and tokenizer are fetched
  3. an NDIF server on nnsight 0.8.x (this client's protocol):  fv-remote remote check
  4. the model deployed and running there:  fv-remote remote status --model meta-llama/Llama-3.1-70B

    python examples/remote_70b.py [TASK]        (default task: antonym)

Requests: extract (1 per chunk of prompts, resumable), CMA (1), fit = projection + layer sweep (1), evaluate (1),
generate (1). Long jobs: raise the client's wait limit with FV_REMOTE_TIMEOUT (seconds, default 3600); the server's
own execution limit still applies. Results go to out/remote_70b/ (store, FV file, JSON); a rerun resumes.
"""

import json
import os
import sys
from pathlib import Path
from fv_remote.execution import NDIF

MODEL = "meta-llama/Llama-3.1-70B"
OUT = Path("out/remote_70b")
N_PROMPTS, CHUNK = 100, 25  # clean prompts for the mean head outputs; prompts per extract request
N_CMA, K = 25, 10  # shuffled-label prompts for the AIE; heads in the FV


def need(ok: bool, what: str) -> None:
    if not ok:
        print(f"cannot run: {what}", file=sys.stderr)
        sys.exit(1)


def report(stage: str, model) -> None:
    last_job = model.executor.last  # the NDIF executor's record of its latest request

    print(f"  {stage}: job {last_job.job_id}, {last_job.payload_bytes:,} B sent, {last_job.result_bytes:,} B back, "
          f"{last_job.seconds:.0f} s")


def main() -> None:
    from fv_remote import (ActivationStore, Steer, UserError, evaluate_task, extract, fit_function_vector,
                           generate_many, load_task, mean_heads_tensor, prepare_task, run_cma)
    from fv_remote import execution as R

    print(f"fv-remote on NDIF: {MODEL}")
    need(bool(R.api_key()), "no NDIF API key: set NDIF_API_KEY (get one at https://login.ndif.us) or run "
                            "`nnsight login`")
    try:
        check = R.check()
        need(check.ok, f"NDIF at {check.host}: {check.message}")
        need(R.status().running(MODEL), f"{MODEL} is not running on NDIF at {R.host()} right now "
                                        f"(see `fv-remote remote status`)")
        model = R.load_remote_model(MODEL)  # config + tokenizer only (gated: needs your Hub login)
    except UserError as exc:
        need(False, str(exc))
    ad = model.adapter
    print(f"  {ad.n_layers} layers x {ad.n_heads} heads x {ad.head_dim}, d_model {ad.d_model} (weightless copy)")

    task = load_task(sys.argv[1] if len(sys.argv) > 1 else "antonym")
    store = ActivationStore(str(OUT / "store.zarr"))
    prepared = prepare_task(model.tokenizer, task, min_pairs=12)

    # 1. Every head's output at the last token of clean 10-shot prompts. A chunk per request keeps each result
    #    (80 x 64 x 128 values per prompt) to tens of MB; each chunk is committed to the store when it comes back.
    for n in range(CHUNK, N_PROMPTS + 1, CHUNK):
        if store.n_complete(task.name) < n:
            result = extract(model.using(NDIF()), task, store, n_prompts=n, n_shots=10, batch_size=16)
            report(f"extract {n}/{N_PROMPTS} (10-shot accuracy so far {result.accuracy:.2f})", model)
    means = mean_heads_tensor(store, task.name)  # mean over prompts the model answered correctly

    # 2. Average indirect effect of every head on shuffled-label prompts (one request).
    cma = run_cma(model.using(NDIF()), prepared, store, means, n_prompts=N_CMA)
    report(f"CMA ({N_CMA} prompts, {ad.n_layers * ad.n_heads} heads)", model)

    # 3. The FV: the top heads' means pushed through the server's own output projections, then the validation
    #    layer sweep steered by it -- one request; only the K projected vectors and top-1 ids come back.
    fv, sweep = fit_function_vector(model.using(NDIF()), prepared, means, cma.aie, k=K, meta={"store": store.url})
    path = fv.save(OUT / f"{task.name}.fv.safetensors")
    report(f"fit (best layer {fv.layer}, validation accuracy {sweep[fv.layer]:.2f})", model)

    # 4. Evaluation: zero-shot and shuffled 10-shot with/without the FV, and clean 10-shot ICL (one request).
    scores = evaluate_task(model.using(NDIF()), prepared, fv)
    report("evaluate", model)

    # 5. Generation with and without the FV (one request).
    query = prepared.splits.test[0][0]
    prompt = prepared.template.query_text(query)
    plain, steered = generate_many(model.using(NDIF()), [(prompt, None), (prompt, Steer(fv))], max_new_tokens=8)
    report("generate", model)

    results = {"model": MODEL, "task": task.name, "fv": str(path), "heads": fv.heads, "layer": fv.layer,
               "sweep": {str(k): v for k, v in sweep.items()}, "scores": scores.as_json(),
               "generation": {"prompt": prompt, "without": plain, "with_fv": steered}}
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(f"top heads {fv.heads[:5]}, FV at layer {fv.layer}")
    print(f"zero-shot {scores.zero_shot:.2f} -> {scores.zero_shot_fv:.2f} with the FV | shuffled 10-shot "
          f"{scores.shuffled:.2f} -> {scores.shuffled_fv:.2f} | clean 10-shot ICL {scores.icl:.2f}")
    print(f"{prompt!r}: {plain!r} without, {steered!r} with the FV")
    print(f"results: {OUT / 'results.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
