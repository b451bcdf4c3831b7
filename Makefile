# The two commands of the README. Both work on a fresh clone: they build .venv first.
#   make demo   set up, then serve SmolLM2-135M with the shipped HASS head on CPU
#   make test   the test suite (what CI runs)
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.vllm-hass-installed
# vLLM on CPU wants Intel OpenMP preloaded (timings swing 50x without it).
RUNENV   = LD_PRELOAD=$(abspath $(VENV))/lib/libiomp5.so VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1

.PHONY: setup demo test test-fast mutants clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,test]'
	$(BIN)/vllm-hass setup-cpu
	touch $(STAMP)

demo: setup
	$(RUNENV) $(BIN)/vllm-hass demo $(DEMO_ARGS)

test: setup
	$(RUNENV) $(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(RUNENV) $(BIN)/pytest -q -m "not engine and not slow" $(PYTEST_ARGS)

# Each listed bug applied to a copy of the tree must fail its tests (also run by `make test`).
mutants: setup
	$(RUNENV) $(BIN)/python tests/mutants.py $(MUTANTS)

clean:
	rm -rf $(VENV) .pytest_cache
