"""The FFV stage body: every optimisation a stage needs (one relation, a layer search and its final run, a whole
bank) planned as plain values (`Plan`) and run inside one session — plain local traces with the local executor,
ONE request on NDIF. `ffv.finetune`, `ffv.select_layer`, `ffv.train_ffv` and `bank.build_bank` all run it.

Per job, where the model is: the initial vector (scaled there for a random init without an FV), Adam with the cosine
schedule, one trace per step (the loss, saved), backward and step, the validation checks, keeping the best vector
and early stopping. Only each job's best vector, its training record and a few floats come back.

- the cached-prefix fast path: each chunk's whole prompts run once, keeping the keys/values of all but the last
  token and the last token's output of the layer below each job's vector; a step then feeds only the last tokens,
  skips the layers below the vector (their output there is known: the vector changes nothing before its layer) and
  crops the positions the other layers appended off again (no `copy`, which the sandbox refuses);
- prompts are tokenised on the client (the padding and position ids nnsight would use);
- every step's learning rate is computed on the client and set on the optimiser (LambdaLR's exact values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import nnsight
import torch

from fv_remote.core.errors import UserError
from fv_remote.execution import check_shippable, executor_of, stage_session
from fv_remote.relational.ffv_plan import (Examples, FFVRun, FinetuneResult, FinetuneSettings, SourceInfo,
                                           chunk_examples, cosine_factor, finetune_result, trace_kwargs)
from fv_remote.models.loading import LoadedModel
from fv_remote.relational.overlap import META_KEY
from fv_remote.traces.patching import add_to_residual, layer_hidden
from fv_remote.fv.vectors import FunctionVector

SCORE_BATCH = 64  # `ffv.score`'s batch size (the bank's zero-vector baseline)
# Raised inside the session body when backward() cannot reach the vector: NDIF runs untrusted requests in a runner
# process whose activations are copies of the model's, so no gradient crosses back (ndif 0.1.2's sandbox notes).
NO_GRADIENT = ("fv-remote: no gradient reached the steering vector: NDIF's sandbox for ordinary (untrusted) requests "
               "does not carry gradients back to your code, so fine-tuning cannot run there; run it locally, or on a "
               "server that runs your requests trusted")


def encode_chunk(model: LoadedModel, texts: list[str], targets: torch.Tensor, fast: bool) -> dict:
    """A chunk as plain tensors: whole prompts ("full"), and for the fast path the last tokens' view ("last")."""
    enc = model.tokenizer(list(texts), return_tensors="pt", padding=True)  # nnsight set left padding
    ids, mask = enc["input_ids"], enc["attention_mask"]
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    chunk = {"n": len(texts), "targets": targets.clone(),
             "full": {"input_ids": ids, "attention_mask": mask, "position_ids": position}}
    if fast:
        chunk["last"] = {"input_ids": ids[:, -1:], "attention_mask": mask, "position_ids": position[:, -1:],
                         "use_cache": True}
    return chunk


class Plan:
    """Datasets and jobs for `run_jobs`, built on the client as plain values (they travel in the request)."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.datasets: list[list[dict]] = []
        self.jobs: list[dict] = []

    def data(self, data: Examples | None, batch_size: int, seed: int = 0, fast: bool = True,
             shuffle: bool = True) -> int | None:
        """Add a dataset (fixed chunks, shuffled once); its index, or None for no data."""
        if data is None or not len(data):
            return None
        self.datasets.append([encode_chunk(self.model, texts, targets, fast)
                              for texts, targets in chunk_examples(data, batch_size, seed, shuffle)])
        return len(self.datasets) - 1

    def job(self, s: FinetuneSettings, train: int | None, valid: int | None, layer: int, init: torch.Tensor,
            scale_texts: list[str] | None = None, baseline: int | None = None, search: Sequence[int] = ()) -> int:
        """Add a fine-tuning job; layer -1 means "the best layer of the `search` jobs" (decided on the server)."""
        if train is None:
            raise UserError("no training prompts")
        d = self.model.adapter.d_model
        if init.shape != (d,):
            raise UserError(f"initial vector has shape {tuple(init.shape)}, the model needs ({d},)")
        if layer >= 0:
            layer = self.model.adapter.check_layer(layer)
        # The trained vector and its Adam state are float32 whatever the model's dtype, on the device where the
        # model's inputs go (the CPU for a weightless remote copy); `add_to_residual` casts it at the add site.
        self.jobs.append({"train": train, "valid": valid, "layer": int(layer), "search": list(search),
                          "init": init.detach().to(device=_vector_device(self.model), dtype=torch.float32).clone(),
                          "scale_texts": scale_texts, "baseline": baseline,
                          "steps": s.steps, "lrs": [s.lr * cosine_factor(s, i) for i in range(s.steps)],
                          "l2": s.l2, "eval_every": s.eval_every, "patience": s.patience})
        return len(self.jobs) - 1



def _vector_device(model: LoadedModel) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) and not executor_of(model).ndif else torch.device("cpu")


def run_jobs(model: LoadedModel, datasets: list[list[dict]], jobs: list[dict]) -> list[dict]:
    """Every job of `Plan` in one stage session, where the model's executor runs it (one NDIF request on NDIF;
    plain local traces locally).

    Returns per job: layer, vector (the best, CPU), history, best_step, best_loss, best_acc, stopped, init_norm,
    baseline_acc (zero-shot accuracy on the baseline dataset, or None), moved / kept_moved (||last - start||,
    ||kept - start||).

    The session body has one statement per line and no comment lines up to its last trace: nnsight 0.8.1 ships it
    re-generated by `ast.unparse`, and its in-process dry run (`DryRun`) then looks nested traces up in the
    original file by the re-generated line numbers, which only agree when nothing before them collapses.
    Plain loops, no comprehensions, between the first loop's traces: on the server (Python 3.12, whose comprehensions
    run inline in the enclosing frame) a dict comprehension there stopped nnsight writing the next trace's results
    back into the body's variables, so every chunk got the first chunk's cache (`make test-ndif` caught it).
    The server sends back every local whose object was saved, by id, and ids of freed saved objects (each trace's
    loss, its KV cache) get reused: so the body ends by clearing its locals, leaving only `results`.
    """
    ad, lm = model.adapter, model.lm
    layers = [ad.layer(lm, index) for index in range(ad.n_layers)]
    is_tuple, unembed, keep = ad.layer_output_is_tuple, ad.unembed(lm), trace_kwargs(model)
    session = executor_of(model).session
    if session:
        check_shippable(datasets=datasets, jobs=jobs)
    results: list[dict] = []
    handoffs = sorted({job["layer"] - 1 for job in jobs if job["layer"] > 0})  # a search's final layer is among these
    with stage_session(model):
        caches = []  # per dataset, per chunk: (keys/values but the last token's, {layer: its last output}) or None
        for data in datasets:
            row = []
            for chunk in data:
                cached = cache = states = None
                if "last" in chunk:
                    with lm.trace(**chunk["full"], use_cache=True, **keep):
                        states = nnsight.save([])
                        for index in handoffs:
                            states.append(layer_hidden(layers[index], is_tuple)[:, -1:].detach().clone())
                        cache = lm.output.past_key_values.save()
                    cache.crop(-1)
                    replace = {}
                    for index, h in zip(handoffs, states):
                        replace[index] = (h, None) if is_tuple else h
                    cached = (cache, replace)
                row.append(cached)
            caches.append(row)
        for job in jobs:
            layer = job["layer"]
            if layer < 0:  # after a layer search: its best run's layer (validation accuracy, then loss)
                ranked = [(-results[i]["best_acc"], results[i]["best_loss"], n) for n, i in enumerate(job["search"])]
                layer = results[job["search"][min(ranked)[2]]]["layer"]
            v0 = job["init"]
            if job["scale_texts"]:  # random init without an FV: 10% of the residual stream's norm at the layer
                with lm.trace(job["scale_texts"]):
                    norm = layer_hidden(layers[layer], is_tuple)[:, -1].float().norm(dim=-1).mean().save()
                v0 = v0 / v0.norm() * (0.1 * float(norm))
            vector = v0.clone().requires_grad_(True)
            opt = torch.optim.Adam([vector], lr=job["lrs"][0])
            hist = {"step": [], "train_loss": [], "lr": [], "eval_step": [], "valid_loss": [], "valid_acc": []}  # type: ignore[var-annotated]  # session body, unannotated
            best, best_step, best_loss, best_acc, base_acc, stopped = v0.clone(), 0, math.inf, math.nan, None, False
            for step in range(job["steps"] + 1):
                items = [] if step == 0 else [("train", job["train"], (step - 1) % len(datasets[job["train"]]))]
                if job["valid"] is not None and (step == 0 or step % job["eval_every"] == 0 or step == job["steps"]):
                    items += [("valid", job["valid"], i) for i in range(len(datasets[job["valid"]]))]
                if step == 0 and job["baseline"] is not None:
                    items += [("base", job["baseline"], i) for i in range(len(datasets[job["baseline"]]))]
                sums = {"valid": [0.0, 0, 0], "base": [0.0, 0, 0]}  # loss * n, hits, n
                for kind, d, c in items:
                    chunk, cached = datasets[d][c], caches[d][c]
                    vec = vector if kind == "train" else vector.detach() if kind == "valid" else torch.zeros_like(v0)
                    feed = chunk["full"] if cached is None else dict(chunk["last"], past_key_values=cached[0])
                    with lm.trace(**feed, **keep):
                        for below in range(layer if cached is not None else 0):
                            layers[below].skip(cached[1][layer - 1])
                        add_to_residual(layers[layer], is_tuple, vec)
                        logits = unembed.output[:, -1].float()
                        targets = chunk["targets"].to(logits.device)
                        loss = torch.nn.functional.cross_entropy(logits, targets).save()  # type: ignore[attr-defined]  # nnsight proxy .save()
                        hits = (logits.argmax(-1) == targets).sum().save()
                    if cached is not None:  # drop the fed last token again (no_grad: keep this step's graph out)
                        with torch.no_grad():
                            for kv in cached[0].layers:
                                kv.crop(chunk["full"]["input_ids"].shape[1] - 1 - kv.get_seq_length())
                    if kind != "train":
                        sums[kind][0] += float(loss) * chunk["n"]
                        sums[kind][1] += int(hits)
                        sums[kind][2] += chunk["n"]
                        continue
                    hist["step"].append(step)
                    hist["train_loss"].append(float(loss.detach()))
                    hist["lr"].append(job["lrs"][step - 1])
                    if job["l2"]:
                        loss = loss + job["l2"] * (vector - v0).pow(2).sum()
                    opt.zero_grad()
                    opt.param_groups[0]["lr"] = job["lrs"][step - 1]
                    if not loss.requires_grad:
                        raise RuntimeError(NO_GRADIENT)
                    loss.backward()
                    if vector.grad is None:
                        raise RuntimeError(NO_GRADIENT)
                    if not bool(torch.isfinite(vector.grad).all()):
                        raise RuntimeError(f"fv-remote: the gradient is not finite at step {step}: lower --lr")
                    opt.step()
                    if job["valid"] is None:
                        best, best_step = vector.detach().clone(), step
                if sums["base"][2]:
                    base_acc = sums["base"][1] / sums["base"][2]
                if sums["valid"][2]:
                    v_loss, v_acc = sums["valid"][0] / sums["valid"][2], sums["valid"][1] / sums["valid"][2]
                    hist["eval_step"].append(step)
                    hist["valid_loss"].append(v_loss)
                    hist["valid_acc"].append(v_acc)
                    if step == 0 or v_loss < best_loss:
                        best, best_step, best_loss, best_acc = vector.detach().clone(), step, v_loss, v_acc
                    elif step - best_step >= job["patience"]:
                        stopped = True
                        break
            results.append({"layer": layer, "vector": best.detach().cpu(), "history": hist, "best_step": best_step,
                            "best_loss": best_loss, "best_acc": best_acc, "stopped": stopped,
                            "init_norm": float(v0.norm()), "baseline_acc": base_acc,
                            "moved": float((vector.detach() - v0).norm()), "kept_moved": float((best - v0).norm())})
        cache = cached = states = kv = loss = hits = norm = vec = logits = v0 = vector = best = feed = chunk = None  # type: ignore[assignment]  # session unbinds locals
        targets = None
        job = row = data = items = sums = hist = opt = caches = replace = h = None  # type: ignore[assignment]  # unbind
        if session:
            results = nnsight.save(results)
    return results


def to_result(model_id: str, out: dict, s: FinetuneSettings, task: str, init: str,
              source: FunctionVector | SourceInfo | None, n_train: int, n_valid: int, n_batches: int,
              trained_pairs: dict | None = None) -> FinetuneResult:
    """The run's FFV and record; `trained_pairs` (`overlap.record`: the hashes of the pairs it was trained and
    validated on) goes into its meta when known (a job file from before the record has none)."""
    extra = {"n_train": n_train, "n_valid": n_valid, "n_train_batches": n_batches, "moved": out.get("moved"),
             "kept_moved": out.get("kept_moved")}
    if trained_pairs is not None:
        extra[META_KEY] = trained_pairs
    return finetune_result(model_id, out["vector"].float(), int(out["layer"]), out["history"], out["best_step"],
                           out["best_loss"], out["best_acc"], out["stopped"], out["init_norm"], s, task, init, source,
                           extra)


def ffv_run(model_id: str, outs: list[dict], s: FinetuneSettings, name: str, init: str,
            fv: FunctionVector | SourceInfo | None, n_train: int, n_valid: int, n_batches: int, layers: list[int],
            search: list[int], trained_pairs: dict | None = None) -> FFVRun:
    """`ffv.train_ffv`'s result from `run_jobs`' outputs (the search's short runs, then the final run)."""
    found = {at: {"valid_loss": outs[i]["best_loss"], "valid_acc": outs[i]["best_acc"]}
             for at, i in zip(layers, search)}
    result = to_result(model_id, outs[-1], s, name, init, fv, n_train, n_valid, n_batches, trained_pairs)
    if found:
        result.ffv.meta["layer_search"] = {str(k): v for k, v in found.items()}
    return FFVRun(result, found, n_train, n_valid)


def source_info(fv: FunctionVector | None) -> dict | None:
    """What a fine-tuning result records of its starting FV (JSON; see `ffv.finetune_result`)."""
    if fv is None:
        return None
    return {"task": fv.task, "layer": int(fv.layer), "kind": fv.kind, "heads": [list(h) for h in fv.heads]}


def source_from_info(info: dict | None) -> SourceInfo | None:
    """The starting FV's fields from `source_info`, as `ffv.finetune_result` reads them (task, layer, kind, heads)."""
    if info is None:
        return None
    return SourceInfo(task=info["task"], layer=int(info["layer"]), kind=info["kind"],
                      heads=[(int(layer), int(head)) for layer, head in info["heads"]])
