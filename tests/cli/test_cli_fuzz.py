"""A property-based fuzz of the CLI (hypothesis, derandomized: the same cases every run).

Malformed task JSON, analogy JSONL, ratings/analogy CSV, safetensors (vectors and banks), GGUF files and damaged
Zarr stores, plus random option values, go through the real entry point in this process on a tiny random model.
Every case must end with exit 0 or 2 (a user error: one `error:` line, or click's usage message), never a
traceback, and print no NaN/inf unless the input itself contains those words. A damaged store that `store repair`
accepts must verify as intact afterwards, and `fit` on it must never save a vector that is not finite.

The number of cases and the distinct errors seen are printed at the end (`pytest -s tests/test_cli_fuzz.py`).
"""

from __future__ import annotations

import collections
import json
import random
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.cli_harness import Result, invoke, save_tiny_model

FUZZ = settings(max_examples=30, derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a < b][:40]
NAN = re.compile(r"(?<![A-Za-z_])[-+]?(nan|inf|infinity)(?![A-Za-z_])", re.IGNORECASE)
STATS: collections.Counter = collections.Counter()
ERRORS: collections.Counter = collections.Counter()
SLOW: list[tuple[float, str]] = []


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Valid inputs to mutate: a tiny model folder, a task, an FV, a bank, analogy files, a store with a CMA."""
    from fv_remote.relational.bank import BankEntry, RelationBank
    from fv_remote.fv.cma import run_cma
    from fv_remote.data import RelationTask
    from fv_remote.fv.extract import extract, mean_heads_tensor
    from fv_remote.models.loading import load_model
    from fv_remote.store.activations import ActivationStore
    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.vectors import FunctionVector

    root = tmp_path_factory.mktemp("fuzz")
    folder = str(save_tiny_model(root / "tiny"))
    task = root / "toy.json"
    task.write_text(json.dumps([{"input": a, "output": b} for a, b in PAIRS], indent=1))
    fv = root / "toy.fv.safetensors"
    gen = torch.Generator().manual_seed(0)
    FunctionVector(torch.randn(64, generator=gen), model=folder, task=str(task), layer=1, heads=[(0, 1), (2, 3)],
                   head_means=torch.randn(2, 16, generator=gen), head_vectors=torch.randn(2, 64, generator=gen),
                   meta={"aie": [0.1, 0.05]}).save(fv)
    bank = root / "bank.safetensors"
    RelationBank(folder, [BankEntry("toy", torch.randn(64, generator=gen), 1, {"category": "x"}),
                          BankEntry("other", torch.randn(64, generator=gen), 2, {})]).save(bank)
    mc = root / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"stem": [a, b], "choice": [[c, d], [d, c], [a, c]], "answer": 0})
                            for a, b, c, d in zip(WORDS, WORDS[1:], WORDS[2:], WORDS[3:])) + "\n")
    csv4 = root / "an.csv"
    csv4.write_text("A,B,C,D,D_foil\n" + "\n".join(",".join(WORDS[i:i + 5]) for i in range(8)) + "\n")
    ratings = root / "ratings.csv"
    ratings.write_text("pair1_word1,pair1_word2,pair2_word1,pair2_word2,mean_rating\n" + "\n".join(
        f"{WORDS[i]},{WORDS[i + 1]},{WORDS[i + 2]},{WORDS[i + 3]},{i % 4 + 0.5}" for i in range(9)) + "\n")
    model = load_model(folder)
    store = root / "store.zarr"
    relation = RelationTask("toy", PAIRS, source=str(task))
    s = ActivationStore(str(store))
    extract(model, relation, s, n_prompts=8, n_shots=2, batch_size=4)
    import zarr  # pretend the model answered: `fit` and `cma` use the correctly answered prompts only

    group = zarr.open_group(str(store), mode="r+", path="toy")
    group["correct"][:] = np.ones(group["correct"].shape, dtype=bool)
    prepared = prepare_task(model.tokenizer, relation)
    run_cma(model, prepared, s, mean_heads_tensor(s, "toy"), n_prompts=2, n_shots=2)
    gguf_path = root / "tiny.gguf"
    _write_gguf(gguf_path)
    return {"root": root, "folder": folder, "task": str(task), "fv": str(fv), "bank": str(bank), "mc": str(mc),
            "csv4": str(csv4), "ratings": str(ratings), "store": store, "gguf": gguf_path}


def _write_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", autouse=True)
def cached_model(env):
    """Load the tiny model once (the fuzz is about inputs, not about loading the same folder 200 times)."""
    from fv_remote.models import loading as models

    real = models.load_model
    cache = {}

    def load(name, *args, **kwargs):
        if name == env["folder"] and not args and not kwargs:
            if name not in cache:
                cache[name] = real(name)
            return cache[name]
        return real(name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(models, "load_model", load)
        yield


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    total = sum(STATS.values())
    lines = [f"CLI fuzz: {total} cases ({', '.join(f'{k} {v}' for k, v in sorted(STATS.items()))}); "
             f"{len(ERRORS)} distinct error messages"]
    lines += [f"  {n:3d} x {msg}" for msg, n in ERRORS.most_common(40)]
    lines += [f"  slowest option case {t:.1f} s: {args}" for t, args in sorted(SLOW, reverse=True)[:3]]
    print("\n" + "\n".join(lines))


# --- the property ------------------------------------------------------------------------------------------------


def check(result: Result, kind: str, inputs: str = "", outputs: tuple[Path, ...] = ()) -> Result:
    """Exit 0 or 2, no traceback, one error line (or click's usage message), no unexplained NaN/inf."""
    STATS[kind] += 1
    assert not result.traceback, f"{kind}: traceback\n{result.describe()}"
    assert result.code in (0, 2), f"{kind}: exit {result.code}\n{result.describe()}"
    if result.code == 2:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        usage = "Usage:" in result.stderr
        assert usage or (lines and lines[-1].startswith("error:")), f"{kind}: no error line\n{result.describe()}"
        if not usage:
            assert sum(line.startswith("error:") for line in lines) == 1, result.describe()
        ERRORS[_shape(lines[-1] if not usage else "usage: " + _usage(result.stderr))] += 1
    if not NAN.search(inputs):
        for text, where in [(result.stdout, "stdout")] + [(p.read_text(errors="replace"), str(p))
                                                           for p in outputs if p.is_file()]:
            found = NAN.search(text.replace("NaN/inf", ""))  # "NaN/inf" is how errors name what they found
            if found and "non_finite" not in text and "not a number" not in text:
                raise AssertionError(f"{kind}: {found.group(0)!r} in {where} without a reason\n{result.describe()}")
    return result


def _shape(line: str) -> str:
    """An error line with paths and numbers masked, so equal errors count once."""
    line = re.sub(r"/[^\s:'\"),;]+", "PATH", line)
    line = re.sub(r"\d+", "N", line)
    return line[:150]


def _usage(text: str) -> str:
    m = re.search(r"(Invalid value|No such option|Missing|Got unexpected|requires an argument)[^\n│]*", text)
    return m.group(0).strip() if m else "usage error"


# --- strategies --------------------------------------------------------------------------------------------------

texts = st.text(max_size=30)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4),
                           max_leaves=10)


def mutated(data: bytes):
    """Truncations, byte changes, insertions and deletions of `data`."""
    n = len(data)
    return st.one_of(
        st.integers(0, n).map(lambda i: data[:i]),
        st.tuples(st.integers(0, n - 1), st.integers(0, 255)).map(lambda t: data[:t[0]] + bytes([t[1]])
                                                                  + data[t[0] + 1:]),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=16)).map(lambda t: data[:t[0]] + t[1]
                                                                           + data[t[0]:]),
        st.tuples(st.integers(0, n), st.integers(1, 64)).map(lambda t: data[:t[0]] + data[t[0] + t[1]:]),
        st.binary(max_size=64),
    )


def write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    path.write_bytes(data)
    return path


def _text_of(data) -> str:
    return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)


# --- task files ----------------------------------------------------------------------------------------------------

entries = st.one_of(texts, st.sampled_from(["", " ", "\n", "a" * 2001, "Q:", "\x00", "é", "日本"]), st.integers())
task_structures = st.one_of(
    json_values.map(json.dumps),
    st.lists(st.fixed_dictionaries({"input": entries, "output": entries}), max_size=30).map(json.dumps),
    st.fixed_dictionaries({"name": texts, "pairs": st.lists(st.lists(entries, max_size=3), max_size=20)}).map(
        json.dumps),
)


@FUZZ
@given(data=st.one_of(task_structures, st.just(b"").flatmap(lambda _: mutated(Path(_valid_task()).read_bytes()))))
def test_fuzz_task_files(env, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("task")
    path = write(folder / "task.json", data)
    check(invoke("data", "show", path, "--n", "3", "--n-shots", "2"), "task/data-show", _text_of(data))
    result = check(invoke("extract", "-t", path, "-s", folder / "s.zarr", "-m", env["folder"], "--n-prompts", "3",
                          "--n-shots", "2", "--batch-size", "2"), "task/extract", _text_of(data))
    if result.code == 0:
        assert check(invoke("store", "verify", folder / "s.zarr"), "task/verify").code == 0


def _valid_task() -> str:
    return str(Path(_FIXTURE_DIR[0]) / "toy.json")


# --- analogy JSONL and CSV files -------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=15)
@given(data=st.one_of(st.lists(json_values.map(json.dumps), max_size=6).map("\n".join),
                      st.just(0).flatmap(lambda _: mutated(_mc_bytes()))))
def test_fuzz_analogy_jsonl(env, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("mc")
    path = write(folder / "mc.jsonl", data)
    out = folder / "a.json"
    check(invoke("analogy", "--mc", path, "--bank", env["bank"], "-m", env["folder"], "--n-boot", "20",
                 "--json", out), "jsonl/analogy", _text_of(data), (out,))


def _mc_bytes() -> bytes:
    lines = [json.dumps({"stem": [a, b], "choice": [[c, d], [d, c]], "answer": 0})
             for a, b, c, d in zip(WORDS, WORDS[1:], WORDS[2:], WORDS[3:])]
    return "\n".join(lines).encode()


csv_cells = st.one_of(texts, st.sampled_from(["nan", "inf", "-1e309", "", "3.5", '"', "a,b", "x" * 140_000]),
                      st.floats().map(str))


@settings(FUZZ, max_examples=20)
@given(rows=st.lists(st.lists(csv_cells, min_size=1, max_size=6), max_size=8), header=st.booleans(),
       raw=st.one_of(st.none(), st.binary(max_size=80)), mode=st.sampled_from(["ratings", "analogy"]))
def test_fuzz_csv(env, tmp_path_factory, rows, header, raw, mode):
    import csv
    import io

    folder = tmp_path_factory.mktemp("csv")
    buf = io.StringIO()
    writer = csv.writer(buf)
    if header:
        writer.writerow(["pair1_word1", "pair1_word2", "pair2_word1", "pair2_word2", "mean_rating"] if mode ==
                        "ratings" else ["A", "B", "C", "D", "D_foil"])
    writer.writerows(rows)
    data: bytes | str = raw if raw is not None else buf.getvalue()
    path = write(folder / "in.csv", data)
    out = folder / "out.json"
    if mode == "ratings":
        args = ("align", "--ratings", path, "--bank", env["bank"], "-m", env["folder"], "--n-boot", "20", "--json",
                out, "--plot", folder / "s.png")
    else:
        args = ("analogy", "--csv", path, "--bank", env["bank"], "-m", env["folder"], "--n-boot", "20", "--json", out)
    check(invoke(*args), f"csv/{mode}", _text_of(data), (out,))


# --- safetensors: vectors and banks ---------------------------------------------------------------------------------


tensor_shapes = st.lists(st.integers(0, 70), min_size=0, max_size=3)


@st.composite
def fuzzed_vector_files(draw):
    """Structurally valid safetensors with odd tensors and metadata (shapes, NaN, layers, heads, kinds)."""
    shape = draw(st.one_of(st.just([64]), tensor_shapes))
    fill = draw(st.sampled_from(["randn", "nan", "inf", "zeros", "huge"]))
    n = int(np.prod(shape)) if shape else 1
    values = {"randn": torch.randn(n), "nan": torch.full((n,), float("nan")), "inf": torch.full((n,), float("inf")),
              "zeros": torch.zeros(n), "huge": torch.full((n,), 3e38)}[fill].reshape(shape)
    tensors = {"vector": values.contiguous()}
    if draw(st.booleans()):
        tensors["heads"] = torch.tensor(draw(st.lists(st.lists(st.integers(-3, 6), min_size=0, max_size=3),
                                                      min_size=1, max_size=3).filter(
            lambda rows: len({len(r) for r in rows}) == 1)), dtype=torch.int64)
    if draw(st.booleans()):
        tensors["head_means"] = torch.randn(draw(st.integers(0, 3)), draw(st.sampled_from([16, 3])))
    meta = {"model": draw(st.sampled_from(["FOLDER", "other"])), "layer": draw(st.sampled_from(
        ["1", "0", "-1", "99", "x", "", "2.5"])), "kind": draw(st.sampled_from(["fv", "ffv", "weird"])),
        "task": draw(st.sampled_from(["", "toy", "TASK", "nonexistent"])),
        "meta": draw(st.sampled_from(["{}", "[]", "not json", '{"aie": [1, 2]}', "null"]))}
    return tensors, meta, fill


@settings(FUZZ, max_examples=35)
@given(case=st.one_of(st.tuples(st.just("bytes"), st.just(0).flatmap(lambda _: mutated(_fv_bytes()))),
                      st.tuples(st.just("struct"), fuzzed_vector_files())),
       command=st.sampled_from(["steer", "decode", "generate", "steer-distributed"]))
def test_fuzz_vector_files(env, tmp_path_factory, case, command):
    from safetensors.torch import save

    folder = tmp_path_factory.mktemp("fv")
    kind, payload = case
    if kind == "bytes":
        data = payload
    else:
        tensors, meta, _ = payload
        meta = {k: (env["folder"] if v == "FOLDER" else env["task"] if v == "TASK" else v) for k, v in meta.items()}
        data = save(tensors, metadata=meta)
    path = write(folder / "v.safetensors", data)
    args = {"steer": ("steer", "--fv", path, "-m", env["folder"], "--prompt", "Q: hot\nA:"),
            "steer-distributed": ("steer", "--fv", path, "-m", env["folder"], "--prompt", "Q: hot\nA:",
                                  "--distributed"),
            "generate": ("generate", "--fv", path, "-m", env["folder"], "--prompt", "Q: hot\\nA:",
                         "--max-new-tokens", "3"),
            "decode": ("decode", path, "-m", env["folder"], "--top-k", "3", "--words", "cold,hot")}[command]
    check(invoke(*args), f"safetensors/{command}")


def _fv_bytes() -> bytes:
    return (Path(_FIXTURE_DIR[0]) / "toy.fv.safetensors").read_bytes()


_FIXTURE_DIR: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _remember_dir(env):
    _FIXTURE_DIR[:] = [str(env["root"])]
    yield


@settings(FUZZ, max_examples=20)
@given(data=st.one_of(st.just(0).flatmap(lambda _: mutated((Path(_FIXTURE_DIR[0]) / "bank.safetensors")
                                                           .read_bytes())),
                      st.tuples(st.sampled_from(["[]", "[1, 2]", '["a"]', '["a", "b", "c"]', "{}", "x"]),
                                st.sampled_from(["[]", "[1, 2]", '[{"category": 1}, "x"]', "{}", "x"]),
                                st.sampled_from(["{}", "[]", "x"]), tensor_shapes, st.integers(0, 3))))
def test_fuzz_bank_files(env, tmp_path_factory, data):
    from safetensors.torch import save

    folder = tmp_path_factory.mktemp("bank")
    if isinstance(data, tuple):
        names, entries, settings_, shape, n_layers = data
        data = save({"vectors": torch.randn(*shape) if shape else torch.randn(()),
                     "layers": torch.arange(n_layers)},
                    metadata={"format": "fv-remote-bank", "model": env["folder"], "names": names, "entries": entries,
                              "settings": settings_})
    path = write(folder / "b.safetensors", data)
    check(invoke("bank", "info", path, "--json", folder / "i.json"), "safetensors/bank-info", "",
          (folder / "i.json",))
    check(invoke("analogy", "--mc", env["mc"], "--bank", path, "-m", env["folder"], "--n-boot", "10"),
          "safetensors/bank-analogy")


# --- GGUF ---------------------------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=12)
@given(data=st.one_of(st.just(0).flatmap(lambda _: mutated((Path(_FIXTURE_DIR[0]) / "tiny.gguf").read_bytes())),
                      st.binary(max_size=64).map(lambda b: b"GGUF" + struct.pack("<I", 3) + b)))
def test_fuzz_gguf(env, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("gguf")
    path = write(folder / "m.gguf", data)
    check(invoke("steer", "--fv", env["fv"], "-m", path, "--prompt", "x"), "gguf/steer")


# --- job files ---------------------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=25)
@given(doc=st.one_of(json_values, st.fixed_dictionaries({"job_id": json_values, "stage": json_values,
                                                          "settings": json_values, "submitted": json_values,
                                                          "state": json_values})),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzz_job_files(tmp_path_factory, doc, raw):
    """`jobs list` reads every job file in FV_REMOTE_JOBS (nothing here reaches NDIF)."""
    import os

    folder = tmp_path_factory.mktemp("jobs")
    write(folder / "job1.json", raw if raw is not None else json.dumps(doc))
    old = os.environ.get("FV_REMOTE_JOBS")
    os.environ["FV_REMOTE_JOBS"] = str(folder)
    try:
        check(invoke("jobs", "list"), "jobs/list")
    finally:
        if old is None:
            os.environ.pop("FV_REMOTE_JOBS", None)
        else:
            os.environ["FV_REMOTE_JOBS"] = old


# --- damaged stores ----------------------------------------------------------------------------------------------


damage_ops = st.lists(st.tuples(st.sampled_from(["delete", "truncate", "garble", "json", "nan", "grow"]),
                                st.integers(0, 10_000), st.integers(0, 10_000)), min_size=1, max_size=3)


def _damage(store: Path, ops) -> None:
    import zarr

    files = sorted(p for p in store.rglob("*") if p.is_file())
    for op, a, b in ops:
        files = [p for p in files if p.exists()]
        if not files:
            return
        target = files[a % len(files)]
        data = target.read_bytes()
        if op == "delete":
            target.unlink()
        elif op == "truncate":
            target.write_bytes(data[: b % (len(data) + 1)])
        elif op == "garble" and data:
            i = b % len(data)
            target.write_bytes(data[:i] + bytes([(data[i] + 1 + a) % 256]) + data[i + 1:])
        elif op == "json":
            target.with_name("zarr.json").write_text(json.dumps(random.Random(a).choice(
                [None, [], {}, {"node_type": "array"}, {"node_type": "group", "attributes": {"n_complete": b}},
                 {"node_type": "group", "attributes": {"n_complete": "x"}}, "text"])))
        elif op == "nan":
            try:
                group = zarr.open_group(str(store), mode="r+", path="toy")
                row = np.asarray(group["head_out"][a % 8])
                row.flat[b % row.size] = np.nan
                group["head_out"][a % 8] = row
            except Exception:  # noqa: BLE001 - already too damaged to write through zarr: fine
                pass
        elif op == "grow":
            try:
                group = zarr.open_group(str(store), mode="r+", path="toy/cma" if a % 2 else "toy")
                arr = next(arr for _, arr in group.arrays() if (arr.metadata.dimension_names or [""])[0] == "prompt")
                arr.resize((arr.shape[0] + 1 + b % 40, *arr.shape[1:]))
            except Exception:  # noqa: BLE001
                pass


@settings(FUZZ, max_examples=30)
@given(ops=damage_ops)
def test_fuzz_damaged_store(env, tmp_path_factory, ops):
    folder = tmp_path_factory.mktemp("store")
    store = folder / "s.zarr"
    shutil.copytree(env["store"], store)
    _damage(store, ops)
    check(invoke("store", "info", store), "zarr/info")
    check(invoke("store", "verify", store, "--json"), "zarr/verify")
    fv = folder / "fv.safetensors"
    fit = check(invoke("fit", "-t", env["task"], "-s", store, "-m", env["folder"], "--layer", "1", "--no-sweep",
                       "--k", "2", "-o", fv), "zarr/fit")
    if fit.code == 0:
        from safetensors.torch import load_file

        assert torch.isfinite(load_file(str(fv))["vector"]).all(), "fit saved a vector that is not finite"
    fixed = check(invoke("store", "repair", store), "zarr/repair")
    if fixed.code == 0:
        after = check(invoke("store", "verify", store), "zarr/verify-after-repair")
        assert after.code == 0, f"repair said intact but verify disagrees\n{fixed.describe()}\n{after.describe()}"


# --- option values -----------------------------------------------------------------------------------------------


ints = st.one_of(st.integers(-5, 40), st.sampled_from([0, 10 ** 7, 2 ** 63, -(2 ** 63)])).map(str)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e308])).map(str)
strings = st.one_of(texts, st.sampled_from(["", "-1", "-1,-2", "0", "1,2,x", "auto", "clean", "zero_shot", "-"]))


@st.composite
def option_cases(draw):
    e = _FIXTURE_ENV[0]
    command = draw(st.sampled_from(["extract", "steer", "generate", "evaluate", "data-show", "decode", "fit", "cma",
                                    "align", "bank-info", "finetune"]))
    if command == "extract":
        return ("extract", "-t", e["task"], "-s", "STORE", "-m", e["folder"], "--n-prompts", draw(ints),
                "--n-shots", draw(ints), "--batch-size", draw(ints), "--seed", draw(ints), "--positions",
                draw(strings))
    if command == "steer":
        return ("steer", "--fv", e["fv"], "-m", e["folder"], "--prompt", draw(strings), "--scale", draw(floats),
                "--top", draw(ints), *draw(st.sampled_from([(), ("--layer", draw(ints)), ("--distributed",)])))
    if command == "generate":
        return ("generate", "--fv", e["fv"], "-m", e["folder"], "--prompt", draw(strings), "--max-new-tokens",
                draw(st.integers(-2, 6).map(str)), "--scale", draw(floats))
    if command == "evaluate":
        return ("evaluate", "--fv", e["fv"], "-m", e["folder"], "-t", e["task"], "--n-test",
                draw(st.integers(-2, 6).map(str)), "--n-shots", draw(st.integers(-2, 6).map(str)), "--scale",
                draw(floats), "--json", "OUT/e.json")
    if command == "data-show":
        return ("data", "show", draw(st.sampled_from([e["task"], "antonym", "word-number", draw(strings)])),
                "--n", draw(ints), "--n-shots", draw(ints), "--prompt-kind", draw(strings), "--seed", draw(ints))
    if command == "decode":
        return ("decode", e["fv"], "-m", e["folder"], "--top-k", draw(ints), "--words", draw(strings))
    if command == "fit":
        return ("fit", "-t", e["task"], "-s", str(e["store"]), "-m", e["folder"], "--k", draw(ints), "--no-sweep",
                "--layer", draw(ints), *draw(st.sampled_from([(), ("--share", draw(floats))])), "-o", "OUT/f.fv")
    if command == "cma":
        return ("cma", "-t", e["task"], "-s", "COPY", "-m", e["folder"], "--n-prompts",
                draw(st.integers(-1, 3).map(str)), "--n-shots", draw(st.integers(-1, 4).map(str)), "--top",
                draw(ints), "--method", draw(st.sampled_from(["fast", "naive", "attribution", "nope"])), "--plot",
                "OUT/a.png")
    if command == "align":
        return ("align", "--ratings", e["ratings"], "--bank", e["bank"], "-m", e["folder"], "--temperature",
                draw(floats), "--n-boot", draw(ints), "--method", draw(st.sampled_from(["weights", "cfv", "logp",
                                                                                        "bank", "x"])),
                "--columns", draw(st.sampled_from([None, "a,b", "pair1_word1,pair1_word2,pair2_word1,pair2_word2,"
                                                                "mean_rating"])) or
                "pair1_word1,pair1_word2,pair2_word1,pair2_word2,mean_rating", "--json", "OUT/al.json", "--plot",
                "OUT/al.png")
    if command == "bank-info":
        return ("bank", "info", e["bank"], "--json", draw(st.sampled_from(["OUT/b.json", "OUT", "OUT/x/y.json"])))
    return ("finetune", "-t", e["task"], "--init", draw(st.sampled_from(["zero", "random", "fv", "x"])), "--fv",
            e["fv"], "-m", e["folder"], "--layer", draw(strings), "--steps", draw(st.integers(-1, 3).map(str)),
            "--n-train", draw(st.integers(-1, 14).map(str)), "--n-valid", draw(st.integers(-1, 5).map(str)),
            "--lr", draw(floats), "--batch-size", draw(st.integers(-1, 8).map(str)), "--no-evaluate", "-o",
            "OUT/f.ffv.safetensors")


_FIXTURE_ENV: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _remember_env(env):
    _FIXTURE_ENV[:] = [env]
    yield


@settings(FUZZ, max_examples=120)
@given(case=option_cases())
def test_fuzz_options(env, tmp_path_factory, case):
    folder = tmp_path_factory.mktemp("opt")
    (folder / "OUT").mkdir()
    args = []
    for a in case:
        a = str(a)
        if a == "STORE":
            a = str(folder / "s.zarr")
        elif a == "COPY":
            shutil.copytree(env["store"], folder / "c.zarr")
            a = str(folder / "c.zarr")
        elif a.startswith("OUT"):
            a = str(folder / a)
        args.append(a)
    outputs = tuple(p for p in (folder / "OUT").rglob("*.json"))
    started = time.monotonic()
    result = invoke(*args, cwd=folder)
    SLOW.append((time.monotonic() - started, " ".join(args)[-160:]))
    check(result, f"options/{case[0] if case[0] != 'data' else 'data-show'}", " ".join(map(str, case)),
          outputs + tuple((folder / "OUT").rglob("*.json")))


# --- issue 26: the commands added since, and extreme numbers ---------------------------------------------------------

EXTREME_INTS = st.sampled_from(["0", "-1", "-7", "1", "2", str(10 ** 7), str(2 ** 63)])
EXTREME_FLOATS = st.sampled_from(["0", "-1", "-0.0", "1e-300", "0.5", "3", "1e6", "1e308", "nan", "inf", "-inf"])
METHOD_LISTS = st.lists(st.sampled_from(["cfv", "no_vector", "best_ffv", "icl", "icl_qa", "icl_qa+cfv", "x", ""]),
                        max_size=4).map(",".join)


def _one_extreme(draw, normal: dict[str, str], floats_: dict) -> tuple[str, ...]:
    """The options with ordinary values except (mostly) one, which gets an extreme value: 0, negative, huge, nan,
    inf (integer options: 0, -1, -7, 10**7, 2**63) — one at a time, so the case reaches what that value does."""
    values = dict(normal)
    flag = draw(st.sampled_from([None, *normal]))
    if flag is not None:
        values[flag] = draw(floats_.get(flag, EXTREME_INTS))
    return tuple(x for item in values.items() for x in item)


@st.composite
def new_command_cases(draw):
    """export, import, plan, bank map, analogy's grouping options, finetune and bank build with extreme numbers."""
    e = _FIXTURE_ENV[0]
    command = draw(st.sampled_from(["export", "export-bank", "import", "plan", "bank-map", "analogy", "finetune",
                                    "bank-build"]))
    if command == "export":
        return ("export", "--fv", e["fv"], "-m", e["folder"], "--scale", draw(EXTREME_FLOATS | floats), "--out",
                draw(st.sampled_from(["OUT/x.gguf", "OUT", e["bank"]])))
    if command == "export-bank":
        pick = draw(st.sampled_from([("--entry", draw(st.sampled_from(["toy", "other", "nope", ""]))),
                                     ("--cfv", draw(st.sampled_from(["hot:cold", "hot", ":", "a:b:c"]))),
                                     ("--weights", draw(st.sampled_from(["toy=0.5", "toy=nan", "toy=inf,other=1",
                                                                         "x=1", "toy", "toy=-1e308"])))]))
        return ("export", "--bank", e["bank"], *pick, "-m", e["folder"], "--out", "OUT/b.gguf")
    if command == "import":
        return ("import", draw(st.sampled_from([e["gguf"], e["bank"], e["fv"], e["task"], e["root"], "OUT/none"])),
                "-m", e["folder"], "--out", draw(st.sampled_from(["OUT/i.fv.safetensors", e["bank"]])))
    if command == "plan":
        stage = draw(st.sampled_from(["extract", "cma", "finetune", "bank", "analogy", "nope"]))
        return ("plan", "--stage", stage, "--config", draw(st.sampled_from(["CONFIG", e["folder"]])),
                *_one_extreme(draw, {"--n-prompts": "4", "--steps": "5", "--n-train": "8", "--items": "10",
                                     "--relations": "3", "--tflops": "100", "--limit": "3600", "--bandwidth": "50",
                                     "--memory-gb": "40"},
                              {k: EXTREME_FLOATS for k in ("--tflops", "--limit", "--bandwidth", "--memory-gb")}),
                *draw(st.sampled_from([(), ("--json",), ("--assume-defaults",)])))
    if command == "bank-map":
        return ("bank", "map", draw(st.sampled_from([e["bank"], e["fv"], e["root"]])), "--out", "OUT/m.png",
                "--n-perm", draw(EXTREME_INTS), "--linkage", draw(st.sampled_from(["ward", "average", "single",
                                                                                    "median", ""])),
                "--label", draw(st.sampled_from(["class", "category", "", "x"])), "--json", "OUT/m.json")
    if command == "analogy":
        return ("analogy", "--mc", draw(st.sampled_from([e["mc"], e["mc_prefix"]])), "--bank", e["bank"], "-m",
                e["folder"], "--n-boot", draw(st.sampled_from(["10", "0", "-1"])),
                *draw(st.sampled_from([(), ("--group-by", draw(st.sampled_from(["relation", "family", "prefix",
                                                                                "source", "", "x"])))])),
                *draw(st.sampled_from([(), ("--methods", draw(METHOD_LISTS))])),
                *draw(st.sampled_from([(), ("--bank-sources", draw(st.sampled_from(["todd", "bats,todd", "", ","])))])),
                *_one_extreme(draw, {"--min-group": "10", "--scale": "1", "--temperature": "1"},
                              {"--scale": EXTREME_FLOATS, "--temperature": EXTREME_FLOATS}), "--json", "OUT/a.json")
    numbers = _one_extreme(draw, {"--lr": "0.5", "--l2": "0", "--steps": "2", "--patience": "15",
                                  "--batch-size": "4", "--n-train": "6", "--n-valid": "4", "--seed": "0"},
                           {"--lr": EXTREME_FLOATS, "--l2": EXTREME_FLOATS})
    if command == "finetune":
        return ("finetune", "-t", e["task"], "-m", e["folder"], "--init", draw(st.sampled_from(["zero", "random"])),
                "--layer", draw(st.sampled_from(["1", "0", "-1", "99", "auto"])), *numbers, "--no-evaluate", "-o",
                "OUT/f.ffv.safetensors")
    return ("bank", "build", "--data", e["task"], "-m", e["folder"], "--layer",
            draw(st.sampled_from(["1", "0", "-1", "99"])), *numbers, "--out", "OUT/bank.safetensors")


@pytest.fixture(scope="module", autouse=True)
def _issue26_inputs(env):
    """A JSONL whose prefix is a per-item source id (public analogy sets) and a config.json to plan from."""
    root = env["root"]
    mc = root / "mc_prefix.jsonl"
    mc.write_text("\n".join(json.dumps({"stem": [a, b], "choice": [[c, d], [d, c]], "answer": 0, "prefix": f"id{i}"})
                            for i, (a, b, c, d) in enumerate(zip(WORDS, WORDS[1:], WORDS[2:], WORDS[3:]))) + "\n")
    env["mc_prefix"] = str(mc)
    env["config"] = str(Path(env["folder"]) / "config.json")
    yield


@settings(FUZZ, max_examples=160)
@given(case=new_command_cases(), config=st.one_of(st.none(), st.just(0).flatmap(
    lambda _: mutated(Path(_FIXTURE_ENV[0]["config"]).read_bytes())),
    st.dictionaries(st.sampled_from(["model_type", "hidden_size", "num_attention_heads", "num_hidden_layers",
                                     "vocab_size", "intermediate_size"]),
                    st.one_of(st.sampled_from(["llama", "gpt2", "nope"]), st.integers(-2, 64)), max_size=6).map(
        json.dumps)))
def test_fuzz_new_commands(env, tmp_path_factory, case, config):
    folder = tmp_path_factory.mktemp("new")
    (folder / "OUT").mkdir()
    args = []
    for a in case:
        a = str(a)
        if a == "CONFIG":
            a = str(write(folder / "config.json", config) if config is not None else env["config"])
        elif a.startswith("OUT"):
            a = str(folder / a)
        args.append(a)
    bank_before = Path(env["bank"]).read_bytes()
    started = time.monotonic()
    result = invoke(*args, cwd=folder)
    SLOW.append((time.monotonic() - started, " ".join(args)[-160:]))
    kind = "new/" + (case[0] if case[0] not in ("bank", "export") else "-".join(case[:2]) if case[0] == "bank"
                     else ("export-bank" if "--bank" in case else "export"))
    check(result, kind, " ".join(map(str, case)) + (config or "" if isinstance(config, str) else ""),
          tuple((folder / "OUT").rglob("*.json")))
    assert Path(env["bank"]).read_bytes() == bank_before, "an output path holding the bank overwrote it"
    if result.code != 0:
        return
    if case[0] == "finetune":  # a kept FFV is finite and not its own start (no --allow-unchanged here)
        from fv_remote.fv.vectors import FunctionVector

        ffv = FunctionVector.load(folder / "OUT/f.ffv.safetensors")
        assert torch.isfinite(ffv.vector).all() and ffv.meta.get("unchanged") is False, result.describe()
    if case[0] == "analogy":
        data = json.loads((folder / "OUT/a.json").read_text())
        assert "accuracy by" not in result.stdout or data["group_by"], "a per-group table nobody asked for"
        for g in (data["by_group"] or {}).values():
            assert (g["ci95"] is None) == (g["n"] < 2), "an interval on a group of one item"
    if case[0] == "plan" and "--config" in case and config is not None:
        assert "read from the config" in result.stdout or "--json" in case, result.describe()


@settings(FUZZ, max_examples=20)
@given(target=st.sampled_from(["bank", "fv", "text", "empty", "missing", "notes", "model", "store"]),
       command=st.sampled_from(["verify", "repair", "info"]))
def test_fuzz_store_paths(env, tmp_path_factory, target, command):
    """`store verify/repair/info` on every kind of path: only a store is ever reported intact, and a path that is
    not a store is left exactly as it was (nothing created)."""
    folder = tmp_path_factory.mktemp("paths")
    paths = {"bank": env["bank"], "fv": env["fv"], "text": write(folder / "n.txt", "hello"),
             "empty": folder / "empty", "missing": folder / "missing.zarr", "notes": folder / "notes",
             "model": env["folder"], "store": folder / "s.zarr"}
    (folder / "empty").mkdir()
    (folder / "notes").mkdir()
    write(folder / "notes" / "a.md", "x")
    shutil.copytree(env["store"], folder / "s.zarr")
    before = sorted(p.name for p in folder.rglob("*"))
    result = check(invoke("store", command, paths[target]), f"new/store-{command}-paths")
    if target != "store":
        assert result.code == 2, f"store {command} accepted a {target}\n{result.describe()}"
        assert sorted(p.name for p in folder.rglob("*")) == before
    else:
        assert result.code == 0, result.describe()
