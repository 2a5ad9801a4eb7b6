# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv/, installs everything, runs the demo (a real federation)
#   make test   creates .venv/ if absent, runs the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "fedaigc needs Python 3.11 (torch 2.13.0 CPU wheel)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing fedaigc with every extra into $(VENV)/ (pip's output: $(VENV)/install.log)"
	@# torch first, pinned: its CPU wheel lies on disk; an unpinned torch pulls GBs of CUDA
	@( $(BIN)/python -m pip install --upgrade pip && $(BIN)/python -m pip install torch==2.13.0 \
	   && $(BIN)/python -m pip install -e '.[dev]' ) > $(VENV)/install.log 2>&1 \
	   || { tail -n 40 $(VENV)/install.log; echo "install failed; the whole log is $(VENV)/install.log"; exit 1; }
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedaigc demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/fedaigc bench all

clean:
	rm -rf $(VENV) demo-out .pytest_cache
