# Two commands on a fresh machine:  `make labs` (run every lab, write reports/report.md)
#                                   `make test` (the whole test suite, as CI runs it)
# Both create or reuse the virtual environment in $(VENV) and install the kit with the tested versions.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.labkit-installed
# torch is installed only when the environment has none, so a preinstalled (e.g. CUDA) build is kept.
# On a CPU-only machine elsewhere, TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# avoids the CUDA wheels.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install labs lint test bench clean-venv jupyter

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

labs: $(STAMP)
	$(BIN)/labkit labs

lint: $(STAMP)
	$(BIN)/ruff check labkit notebooks/src tests

# lint first (seconds), then two workers with one thread each: torch threads spinning on a shared
# 2-core machine thrash
test: $(STAMP)
	$(BIN)/ruff check labkit notebooks/src tests
	LABKIT_MODE=smoke OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile tests notebooks \
		--nbval --nbval-current-env --nbval-cell-timeout=600 --nbval-sanitize-with tests/nbval_sanitize.cfg $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/labkit bench all

jupyter: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)
