# The two commands a newcomer needs: `make serve` and `make test`. Both set up .venv from scratch first.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
# Offline mirror of the official weights (CI and this workplace have no internet); unset = official URLs.
ifneq ($(wildcard $(SHARED)/models),)
export SSD_WEIGHTS_MIRROR ?= $(SHARED)/models
endif

.PHONY: setup serve test system-deps

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
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus docker-compose shellcheck chromium
