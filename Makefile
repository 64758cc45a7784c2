# Two commands a new user needs: `make demo` and `make test`. Both create .venv when it is missing or
# stale (the stamp is a hash of requirements/*.txt; the package itself is installed editable), then do their job.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
REQS   := requirements/torch.txt requirements/base.txt requirements/nodeps.txt
STAMP  := $(VENV)/.stamp-$(shell cat $(REQS) | sha256sum | cut -c1-16)
INSTALLED := $(VENV)/.installed
DEMO   ?= demo-out

.PHONY: env demo test test-all lint clean

env: $(STAMP) $(INSTALLED)

$(STAMP): $(REQS)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q -r requirements/base.txt
	$(PY) -m pip install -q --no-deps -r requirements/nodeps.txt
	touch $@

# the package itself (editable) and its `quadit` command, redone when pyproject.toml changes
$(INSTALLED): pyproject.toml $(STAMP)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: env
	$(PY) scripts/export.py --model sao-mini --synthetic-weights --scheme fp32 --out $(DEMO)/export
	$(PY) scripts/generate.py --export $(DEMO)/export --prompt "rain on a tin roof with distant thunder" \
		--seconds 5 --seed 7 --out $(DEMO)/rain.wav
	@echo "demo: ONNX graphs and manifest in $(DEMO)/export, audio in $(DEMO)/rain.wav"

test: env
	$(PY) -m pytest -q tests

# ruff (lint + import order, configured in pyproject.toml); installed on first use, outside the env's stamp
lint: env
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q -r requirements/lint.txt
	$(PY) -m ruff check .

test-all: env
	$(PY) -m pytest -q --run-slow tests

clean:
	rm -rf $(VENV) $(DEMO)
