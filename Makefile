# Every target sets itself up on a fresh machine: venv, CPU torch (only when no torch is installed), project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: help setup test test-fast lint demo clean

help:  ## show the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,demo,tensorboard,dicom,onnx,openvino]"
	$(PY) -m pip install -q --no-deps liver-ct-segmentation-package || echo "LiTS sample scan unavailable; the demo uses phantoms only"
	@touch $(STAMP)

setup: $(STAMP)  ## create/reuse .venv and install the project with its dev, demo and optional-feature extras

# One pytest process per test file: a process that had loaded OpenVINO (test_openvino, runtime=auto predict runs)
# and ran other files' in-process training died with SIGSEGV (no Python traceback) in a later test that starts
# child processes (test_predict_cli's two-process predict, test_training_ddp), three times on fresh clones; every
# file passes in a process of its own. The cause is not found yet (see the issue notes).
test: setup  ## run the whole test suite (slow tests included), one pytest process per test file
	@status=0; for f in $(sort $(wildcard tests/test_*.py)); do $(PY) -m pytest -q $$f || status=1; done; exit $$status

test-fast: setup  ## skip tests marked slow
	$(PY) -m pytest -q -m "not slow"

lint: setup  ## ruff
	$(VENV)/bin/ruff check .

demo: setup  ## demo data -> demo teacher -> region experts -> evaluation (CPU, < 15 min)
	$(PY) scripts/demo.py

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache .ruff_cache
