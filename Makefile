# The two commands a newcomer needs: `make serve` and `make test`. Both set up .venv from scratch first.
VENV ?= .venv
PY := $(VENV)/bin/python
# Which torch build this machine gets (pyproject.toml states only ranges): see constraints/cpu-ci.txt.
CONSTRAINTS ?= constraints/cpu-ci.txt
SHARED ?= $(abspath ../shared)
# Offline mirror of the official weights (CI and this workplace have no internet); unset = official URLs.
ifneq ($(wildcard $(SHARED)/models),)
export SSD_WEIGHTS_MIRROR ?= $(SHARED)/models
endif

.PHONY: setup serve test system-deps lock gpu-check gpu-wheels

setup: $(VENV)/.installed

# The venv's own pip (23.2 on Python 3.11's venv, or newer): the metadata needs no newer one.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[export,server,test]"
	touch $@

serve: setup
	$(PY) -m server

test: setup
	$(PY) -m pytest

# Debian packages the tests use: a real Prometheus (with promtool), docker-compose v1, shellcheck, Chromium (browser
# tests), wrk, nginx and haproxy (peers and front ends in the benchmark and deployment tests).
system-deps:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    prometheus docker-compose shellcheck chromium wrk nginx haproxy

# The images' lock files, from pyproject.toml's extras, for the images' Python (3.12; needs pip-tools there and PyPI).
LOCK_PYTHON ?= python3.12
LOCK_VENV ?= .cache/lock-venv
COMPILE = $(LOCK_VENV)/bin/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(LOCK_PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q pip-tools; }
	$(LOCK_VENV)/bin/python docker/requirements.py --extras server > docker/requirements-cpu.in
	$(LOCK_VENV)/bin/python docker/requirements.py --extras export --exclude torch --exclude torchvision > docker/requirements-export-cpu.in
	$(LOCK_VENV)/bin/python docker/requirements.py --extras server,export,gpu --exclude onnxruntime --exclude tensorrt > docker/requirements-gpu.in
	$(COMPILE) -o docker/requirements-cpu.lock docker/requirements-cpu.in
	$(COMPILE) -o docker/requirements-export-cpu.lock docker/requirements-export-cpu.in
	$(COMPILE) -c constraints/docker-gpu.txt -o docker/requirements-gpu.lock docker/requirements-gpu.in

# On a GPU host: the GPU paths end to end in < 10 min, one summary table (scripts/gpu_check.py). Uses the host's
# python3 with its own torch/torchvision (never the pinned ones); exits at once, status 2, without a GPU.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) scripts/gpu_check.py

# Where there is network: the wheels gpu-check installs, at the versions CI tests, when an offline GPU host lacks one
# of its requirements (into .venv-gpu, which also sees the host's packages). Run it with the GPU host's Python version
# and copy wheels/ with the tree; wheels of what the host already has may be deleted to save room.
gpu-wheels:
	$(GPU_PY) scripts/gpu_check.py --requirements | \
	    xargs -d '\n' $(GPU_PY) -m pip download -q --only-binary=:all: -c $(CONSTRAINTS) -d wheels
