# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv once (torch first, as a
# CPU wheel: an unpinned torch would pull gigabytes of CUDA), fetch the default model once, then run.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
FV      := $(VENV)/bin/fv-remote
STAMP   := $(VENV)/.fv-remote-installed
MODEL   ?= smollm2-135m
DEMO_OUT ?= out/demo
DEMO_TASKS ?= present-past singular-plural capitalize country-capital
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup model demo test lint test-fast test-ndif ndif-env test-llamacpp bench clean import-graph docs notebooks

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (once)"
	@$(PY) -m pip install -q torch==2.13.0 2>&1 | grep -v -i warning || true
	@$(PY) -m pip install -q -e '.[test]' 2>&1 | grep -v -i warning || true
	@$(PY) -m pip install -q --no-deps 'lxt==2.1' 2>&1 | grep -v -i warning || true
	@$(PY) -c "import fv_remote.cli.app, fv_remote.traces, torch, nnsight, lxt" && touch $(STAMP)

model: setup
	@$(FV) models pull $(MODEL)

demo: model
	@$(FV) run $(DEMO_TASKS) --model $(MODEL) --out $(DEMO_OUT)

test: model lint
	@$(PY) -m pytest -q -m "not ndif"

lint: setup
	@$(PY) -m ruff check fv_remote cli traces examples tools tests/test_import_graph.py tests/test_api_docs.py
	@$(PY) -m mypy

test-fast: setup
	@$(PY) -m pytest -q -m "not integration and not ndif"

# The real NDIF server (PyPI ndif 0.1.2) on 127.0.0.1: a separate Python 3.12 environment (.venv-ndif, ~5.5 GB, set up
# once), then every --remote stage through the CLI, trusted and sandboxed (tests/real_ndif/). ~15 min on 2 cores.
NDIF_VENV ?= .venv-ndif
ndif-env:
	@bash tests/ndif_stack/setup_env.sh $(NDIF_VENV) 2>&1 | grep -v -E "^WARNING: (Location|Ignoring)" || true
	@test -f $(NDIF_VENV)/.ndif-installed

test-ndif: model ndif-env
	@FV_REMOTE_NDIF_VENV=$(abspath $(NDIF_VENV)) $(PY) -m pytest -q -s -m ndif tests/real_ndif -p no:cacheprovider

# llama.cpp itself (not in `make test`): llama-cpp-python from PyPI built once into .venv-llamacpp (one compile job,
# ~50 min on a busy 2-core machine), then the exported present-past FV as a control vector in llama.cpp vs our
# --positions all (benchmarks/llamacpp_check.py).
LLAMACPP_VENV ?= .venv-llamacpp
test-llamacpp: model
	@bash benchmarks/llamacpp/setup_env.sh $(LLAMACPP_VENV) 2>&1 | grep -v -E "^WARNING: (Location|Ignoring)" || true
	@test -f $(LLAMACPP_VENV)/.llamacpp-installed
	@test -f $(DEMO_OUT)/present-past.fv.safetensors || $(FV) run present-past --model $(MODEL) --out $(DEMO_OUT)
	@$(PY) benchmarks/llamacpp_check.py --fv $(DEMO_OUT)/present-past.fv.safetensors --venv $(LLAMACPP_VENV)

# The subpackages' import graph (docs/import_graph.svg) and its report: longest chain, cycles, imports against the
# layer order declared in tools/import_graph.py (exit 1 on one that is not allowlisted there). grimp + matplotlib.
import-graph: setup
	@$(PY) tools/import_graph.py --out docs/import_graph.svg

# docs/API.md from the docstrings of fv_remote.__all__, ARCHITECTURE.md's stage table from the stage registry (tests
# check both are current), and the import graph.
docs: import-graph
	@$(PY) tools/api_docs.py --out docs/API.md
	@$(PY) tools/stage_table.py

# Run examples/*.ipynb top to bottom with nbclient (offline, on smollm2-135m); outputs are not written back.
notebooks: model
	@$(PY) tools/run_notebooks.py examples/*.ipynb

bench: model
	@for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(NDIF_VENV) $(LLAMACPP_VENV) out .pytest_cache
