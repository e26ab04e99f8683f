# The two commands a newcomer needs: `make serve` and `make test`. Both set up .venv from scratch first.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
# Offline mirror of the official weights (CI and this workplace have no internet); unset = official URLs.
ifneq ($(wildcard $(SHARED)/models),)
export SSD_WEIGHTS_MIRROR ?= $(SHARED)/models
endif

.PHONY: setup serve test system-deps gpu-check gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[export,server,test]"
	touch $@

serve: setup
	$(PY) -m server

test: setup
	$(PY) -m pytest

# Debian packages the deployment tests use: a real Prometheus (with promtool) and docker-compose v1.
system-deps:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus docker-compose shellcheck

# On a GPU host: the GPU paths end to end in < 10 min, one summary table (scripts/gpu_check.py). Uses the host's
# python3 with its own torch/torchvision (never the pinned ones); exits at once, status 2, without a GPU.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) scripts/gpu_check.py

# Where there is network: the pure-Python wheels gpu-check installs on an offline GPU host (into .venv-gpu, which
# sees the host's torch). Copy wheels/ with the tree; GPU_PY should be the GPU host's Python version.
GPU_WHEEL_PACKAGES := fastapi "uvicorn[standard]" pydantic pydantic-settings python-multipart pillow \
	prometheus-client orjson onnx tflite httpx pytest opencv-python-headless pyyaml
gpu-wheels:
	$(GPU_PY) -m pip download -q --only-binary=:all: -d wheels $(GPU_WHEEL_PACKAGES)
