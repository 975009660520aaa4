# asymoe — `make demo` trains the default experiment; `make test` runs the test suite.
# Both create .venv and install the package (with its dev extra) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= experiments/asymoe.yaml
# Training stops after 8.5 minutes at the latest, so demo + test stay within 10 minutes on 2 cores.
DEMO_MAX_TIME ?= 00:00:08:30

.PHONY: help install demo lint test test-fast clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision resolve together (PyPI's torchvision only imports beside its own torch).
	$(BIN)/pip install -q "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install asymoe[dev] (once)

demo: install  ## train the default experiment on easy-VQA, test it, print accuracy and the TensorBoard line
	$(BIN)/asymoe fit $(DEMO_CONFIG) trainer.max_time=$(DEMO_MAX_TIME)

lint: install  ## ruff lint + format check (configured in pyproject.toml)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint  ## lint, then the test suite (CPU, a few minutes)
	$(BIN)/python -m pytest -q tests

test-fast: install  ## the test suite without tests marked slow
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:  ## remove runs and caches (keeps .venv)
	rm -rf runs lightning_logs .pytest_cache
