# make demo: set everything up and run a full simulated eviction end to end.
# make test: set everything up, lint (ruff, mypy, lint-imports), run the test suite, then the tests that exercise the
#            direct dependencies again on the LOWEST versions pyproject.toml allows (.venv-lowest).
# Slow things (pip downloads, the llama-server build, Azurite) are cached outside the repo.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export SPOTGUARD_CACHE ?= $(HOME)/.cache/spotguard

LOWEST := .venv-lowest
# Under the lowest versions: the tests that exercise each direct dependency (typer CLI, uvicorn listeners,
# httpx, tenacity retries, boto3/moto, obstore stores, cryptography, PyYAML, prometheus, structlog, NVML,
# anyio) - about a minute. The whole suite there (not llama, not azurite) passes too but takes two more
# minutes, which would break make test's 5-minute budget.
LOWEST_TESTS := tests/test_config.py tests/test_cli_help.py tests/test_asgi_uvicorn.py tests/test_examples.py \
	tests/lb tests/storage/test_store.py tests/storage/test_snapshot.py tests/control tests/agent/test_daemon.py \
	tests/agent/test_preflight.py tests/drain/test_webhook.py tests/gpu tests/ship/test_sdnotify.py \
	tests/clouds/test_aws.py tests/gate/test_proxy.py

.PHONY: setup tools demo test lint lowest bench clean docs

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
	bash tools/build-rootfs.sh bullseye >/dev/null || echo "(no Debian 11 root file system: the old-Python installer test skips)"

# The demo builds llama-server itself on its first run (and says so); without a build it runs a stand-in.
demo: setup
	$(BIN)/spotguard demo

# -n 2: both cores (pytest-xdist); tests wait on processes and sockets much of the time.
test: tools lint lowest
	$(BIN)/pytest -q -n 2
	@echo "== again on the lowest allowed versions of the direct dependencies ($(LOWEST)/requirements.txt) =="
	$(LOWEST)/bin/pytest -q -n 2 -m "not llama and not azurite" $(LOWEST_TESTS)

lowest: setup
	bash tools/setup-lowest.sh $(PYTHON) >/dev/null

lint: setup
	$(BIN)/ruff check spotguard tests bench tools
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: tools
	$(BIN)/python bench/detect.py
	$(BIN)/python bench/drain.py
	$(BIN)/python bench/gate.py
	$(BIN)/python bench/snapshot.py
	$(BIN)/python bench/deregister.py
	$(BIN)/python bench/fleet.py

docs: setup
	$(BIN)/python tools/gen_docs.py

clean:
	rm -rf $(VENV) $(LOWEST) build *.egg-info
