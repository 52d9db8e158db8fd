# Two commands do all the set-up: `make run` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Extra pip options for the CPU build of torch on machines without a GPU, e.g. an --index-url of
# PyTorch's CPU wheels where no local CPU wheel is configured (pip's find-links on our machines).
TORCH_CPU_PIP_OPTS ?=
# pjsua2 (the SIP front end) is built from pjproject's source with deploy/pjsua2's settings and patches, cached
# outside the clone (deploy/pjsua2/build.sh); PJSUA2=none leaves it out (the worker's image has no SIP).
PJSUA2 ?= source
# What is installed, as pyproject.toml's extras: dev (both sides and the test tools), or one side for an image:
# gateway (no torch, no moshi) or worker (no aiortc; with PJSUA2=none, no pjsua2 either); gateway,worker for both.
EXTRAS ?= dev
comma := ,
# torch and moshi are the worker's: left out when the extras name no worker side.
WITH_MODEL := $(if $(filter dev worker,$(subst $(comma), ,$(EXTRAS))),yes,no)
ARGS ?=
PYTEST_ARGS ?=

export NO_TORCH_COMPILE ?= 1

.PHONY: install run test test-fast test-deps bench lint clean

install: $(STAMP)

# torch goes in first and on its own: where there is no NVIDIA GPU the CPU build is taken, so that
# nothing later pulls the multi-gigabyte CUDA wheels. moshi is installed without its dependencies
# (its torch/numpy pins are stale); pyproject.toml declares what it really needs. Neither for a gateway alone.
$(STAMP): pyproject.toml deploy/pjsua2/build.sh deploy/pjsua2/config_site.h $(wildcard deploy/pjsua2/patches/* deploy/pjsua2/ext/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if [ "$(WITH_MODEL)" != yes ]; then \
		echo "EXTRAS=$(EXTRAS): no torch, no moshi"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	else \
		$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_CPU_PIP_OPTS); \
		$(BIN)/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
		|| echo "warning: a CUDA build of torch was installed on a machine without a GPU; set TORCH_CPU_PIP_OPTS"; \
	fi
	if [ "$(WITH_MODEL)" = yes ]; then $(BIN)/python -m pip install --quiet --no-deps "moshi==0.2.13"; fi
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	if [ "$(PJSUA2)" = source ]; then deploy/pjsua2/build.sh --python $(BIN)/python; fi
	touch $(STAMP)

run: install
	$(BIN)/personagate up $(ARGS)

# test-deps first, so that a machine without the tests' system programs hears which to install before the build
# (as root with apt-get it installs them: tests/system-deps.sh). -rs lists every skipped test with its reason.
test: test-deps install
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

# The fast tier: the logic in this process (fake workers, in-memory stores), no worker, gateway, redis-server, sipp or
# browser process and no tiny model, in under 2 minutes (docs/testing.md). `make test` stays the whole suite.
test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

test-deps:
	tests/system-deps.sh

bench: install
	$(BIN)/personagate bench worker $(ARGS)

lint: install
	$(BIN)/ruff check agent_runtime gateway personagate personagate_bench personagate_common tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
