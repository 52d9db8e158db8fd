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
# gateway (no torch, no moshi) or worker (no aiortc; with PJSUA2=none, no pjsua2 either). Each set installs from
# its hashed lock, requirements/<set>.lock (a set of two extras: gateway,worker -> gateway-worker.lock; add it to
# LOCK_SETS and run `make lock` first).
EXTRAS ?= dev
comma := ,
# torch and moshi are the worker's: left out when the extras name no worker side.
WITH_MODEL := $(if $(filter dev worker,$(subst $(comma), ,$(EXTRAS))),yes,no)
LOCK := requirements/$(subst $(comma),-,$(EXTRAS)).lock
DEPS_STAMP := $(VENV)/.deps-$(subst $(comma),-,$(EXTRAS))
# `make lock`: pip-compile (pip-tools, in a throwaway venv outside the clone) writes one lock per set, pinned with
# every file's SHA-256 as PyPI serves them, for CPython 3.11 on Linux (the images' and CI's). torch is resolved at
# TORCH_VERSION but left out of the locks (--unsafe-package torch): which wheel is right depends on the machine
# (PyPI's CUDA build, or the CPU build from PyTorch's CPU index or a local find-links), and so do its hashes and
# the CUDA build's own dependencies (nvidia-*, triton); torch's common dependencies (sympy, networkx, jinja2,
# filelock, fsspec) are in the locks. moshi is hashed apart (requirements/moshi.lock): it goes in --no-deps.
# Existing pins are kept: LOCK_OPTS=--upgrade moves every pin, LOCK_OPTS="--upgrade-package NAME" one.
LOCK_SETS ?= gateway worker dev
LOCK_VENV ?= $(or $(TMPDIR),/tmp)/personagate-lock-venv
PIP_TOOLS_VERSION ?= 7.7.0
MOSHI_VERSION := 0.2.13
LOCK_OPTS ?=
ARGS ?=
PYTEST_ARGS ?=

export NO_TORCH_COMPILE ?= 1

.PHONY: install deps lock run test test-fast test-deps bench lint clean

install: $(STAMP)

# The dependencies alone (the images' layer before the source is copied): everything from the extras' lock with
# --require-hashes (pip and the build backend, setuptools, included), then torch, then moshi. The lock goes first:
# nothing in it needs torch, so torch is installed on its own, as the machine wants it: where there is no NVIDIA GPU
# the CPU build (TORCH_CPU_PIP_OPTS, or the find-links of pip's configuration), so that nothing pulls the
# multi-gigabyte CUDA wheels. moshi is installed without its dependencies (its torch/numpy pins are stale);
# pyproject.toml declares what it really needs. Neither for a gateway alone.
deps: $(DEPS_STAMP)

$(DEPS_STAMP): $(LOCK) requirements/moshi.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	if [ "$(WITH_MODEL)" != yes ]; then \
		echo "EXTRAS=$(EXTRAS): no torch, no moshi"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	else \
		$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_CPU_PIP_OPTS); \
		$(BIN)/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
		|| echo "warning: a CUDA build of torch was installed on a machine without a GPU; set TORCH_CPU_PIP_OPTS"; \
	fi
	if [ "$(WITH_MODEL)" = yes ]; then \
		$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/moshi.lock; fi
	touch $@

# A set of extras without a lock: say what to do (make's own message would only name the file).
requirements/%.lock:
	@echo "no $@ for EXTRAS=$(EXTRAS): add $* to LOCK_SETS and run make lock" >&2; exit 1

# Then the package itself, without dependencies (all are in the venv by now) and without build isolation (the
# build backend is the lock's, not an unhashed download), and pjsua2.
$(STAMP): $(DEPS_STAMP) pyproject.toml deploy/pjsua2/build.sh deploy/pjsua2/config_site.h $(wildcard deploy/pjsua2/patches/* deploy/pjsua2/ext/*)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	if [ "$(PJSUA2)" = source ]; then deploy/pjsua2/build.sh --python $(BIN)/python; fi
	touch $(STAMP)

# Regenerates the locks (see LOCK_SETS above). A resolution that took torch's CUDA build would put its nvidia-*
# wheels in every worker lock: it is refused (LOCK_OPTS="--extra-index-url https://download.pytorch.org/whl/cpu"
# where pip's configuration has no CPU wheel of torch).
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "pip-tools==$(PIP_TOOLS_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(LOCK_VENV)/torch.txt
	for set in $(LOCK_SETS); do \
		CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras \
			--unsafe-package torch --unsafe-package personagate --no-emit-index-url --no-emit-find-links \
			--constraint $(LOCK_VENV)/torch.txt $$(echo $$set | tr - '\n' | sed 's/^/--extra=/') $(LOCK_OPTS) \
			--output-file requirements/$$set.lock pyproject.toml requirements/build.in || exit 1; \
	done
	! grep -lE '^(nvidia-|triton==)' $(foreach set,$(LOCK_SETS),requirements/$(set).lock) \
		|| { echo "these locks took torch's CUDA build: set LOCK_OPTS (see the Makefile)" >&2; exit 1; }
	$(LOCK_VENV)/bin/python -m pip download --quiet --no-deps --only-binary :all: -d $(LOCK_VENV)/moshi \
		"moshi==$(MOSHI_VERSION)"
	{ echo "# moshi, installed with --no-deps by make install (its torch and numpy pins are stale; pyproject.toml's"; \
	  echo "# worker extra lists what it needs). Written by make lock."; \
	  echo "moshi==$(MOSHI_VERSION) \\"; \
	  $(LOCK_VENV)/bin/python -m pip hash $(LOCK_VENV)/moshi/*.whl | sed -n 's/^--hash/    --hash/p'; } \
		> requirements/moshi.lock
	rm -rf $(LOCK_VENV)

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
