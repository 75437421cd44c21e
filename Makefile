# make demo: set everything up and run a full simulated eviction end to end.
# make test: set everything up and run the test suite.
# Slow things (pip downloads, the llama-server build, Azurite) are cached outside the repo.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export SPOTGUARD_CACHE ?= $(HOME)/.cache/spotguard

.PHONY: setup tools demo test lint bench clean docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,aws]'
	touch $@

tools: setup
	bash tools/setup-test-tools.sh
	bash tools/setup-bench-tools.sh
	bash tools/setup-azurite.sh
	bash tools/build-llama-server.sh

demo: setup
	bash tools/build-llama-server.sh >/dev/null 2>&1 || echo "(llama-server build unavailable: the demo uses a stand-in engine)"
	$(BIN)/spotguard demo

test: tools
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check spotguard tests bench tools
	$(BIN)/mypy

bench: tools
	$(BIN)/python bench/detect.py
	$(BIN)/python bench/drain.py
	$(BIN)/python bench/gate.py
	$(BIN)/python bench/snapshot.py
	$(BIN)/python bench/deregister.py

docs: setup
	$(BIN)/python tools/gen_docs.py

clean:
	rm -rf $(VENV) build *.egg-info
