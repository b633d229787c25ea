# fvlm: two entry points, both self-installing on a machine with only Python 3.11 and pip.
#   make demo   synthetic CT-RATE -> preprocess -> train -> zero-shot eval -> metrics
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fvlm-installed
DEMO_OUT ?= demo_out
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo lint bench clean

install: $(STAMP)

# torch first (a CPU build when none is present), so that nothing later resolves a multi-GB CUDA wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/fvlm demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
