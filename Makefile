# Two commands on a fresh machine:  `make labs` (run every lab, write reports/report.md)
#                                   `make test` (the whole test suite, as CI runs it)
# Both create or reuse the virtual environment in $(VENV) and install the kit with the tested versions.
# On a machine with a GPU, run `make gpu` first (the GPU path is untested until a GPU has run it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.labkit-installed
# torch is installed only when the environment has none, so a preinstalled (e.g. CUDA) build is kept.
# On a CPU-only machine elsewhere, TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# avoids the CUDA wheels. environment.yml pins the same version.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install labs lint test bench clean-venv jupyter

comma := ,
# A Chromium on this machine ($$LABKIT_CHROMIUM or on the PATH; `make browser-setup` installs Debian's)
# turns on the browser test: the environment then gets Playwright too (the `browser` extra).
CHROMIUM := $(firstword $(LABKIT_CHROMIUM) $(shell command -v chromium || command -v chromium-browser || command -v google-chrome))
EXTRAS := dev$(if $(CHROMIUM),$(comma)browser)
ROOT_USER := $(filter 0,$(shell id -u))
SUDO := $(if $(ROOT_USER),,sudo)
# `make jupyter` opens your copies of the labs here, never the solution notebooks the tests compare against
WORK ?= work
JUPYTER_ARGS ?=

$(STAMP): pyproject.toml constraints.txt setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -c constraints.txt setuptools -e ".[$(EXTRAS)]"
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
	LABKIT_MODE=smoke LABKIT_HEADLESS=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile tests notebooks \
		--nbval --nbval-current-env --nbval-cell-timeout=600 --nbval-sanitize-with tests/nbval_sanitize.cfg $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/labkit bench all

.PHONY: browser-setup gpu

# your copies of the labs in $(WORK)/: a notebook is copied from notebooks/ only when $(WORK)/ has none of
# that name, so your edits are never overwritten (delete your copy to start that lab afresh)
jupyter: $(STAMP)
	@mkdir -p $(WORK)
	@for nb in notebooks/*.ipynb; do test -e "$(WORK)/$${nb##*/}" || cp "$$nb" "$(WORK)/"; done
	@echo "make jupyter: opening your copies in $(WORK)/ (delete one to get a fresh copy of that lab)"
	$(BIN)/jupyter lab --ServerApp.root_dir=$(WORK) $(if $(ROOT_USER),--allow-root) $(JUPYTER_ARGS)

# Chromium from the system's packages and Playwright from pip (the `browser` extra, pinned in
# constraints.txt): then `make test` runs tests/test_browser.py. Playwright's own browser download is not used.
browser-setup: $(STAMP)
	@if [ -n "$(CHROMIUM)" ]; then echo "browser-setup: using $(CHROMIUM)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get update -q && { $(SUDO) apt-get install -y -q chromium || $(SUDO) apt-get install -y -q chromium-browser; }; \
	else echo "browser-setup: install Chromium with your package manager, or set LABKIT_CHROMIUM=/path/to/chrome"; exit 1; fi
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,browser]"

# the GPU path in one command (under 8 minutes on one H100/H200; refuses without CUDA): see bench/gpu.sh
gpu: $(STAMP)
	@BIN=$(BIN) bash bench/gpu.sh

clean-venv:
	rm -rf $(VENV)
