# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Everything installs into ./.venv; `install` is a no-op when requirements and setup.py are unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.qarm-installed
OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch + the CPU fbgemm build first; then everything else pinned in requirements.txt
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	# torchrec's metadata asks for the CUDA fbgemm-gpu: install it without deps (its needs are in requirements.txt)
	$(PIP) install -q --no-deps torchrec==1.9.2
	@! $(PIP) show fbgemm-gpu >/dev/null 2>&1 || (echo "error: CUDA fbgemm-gpu landed beside fbgemm-gpu-cpu" >&2; exit 1)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchrec, apache_beam, faiss, open_clip, timm, transformers; print('qarm env ok: torch', torch.__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.9.2')"
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/qarm demo --out $(OUT)

# Two workers (one per core); files stay whole on one worker so module fixtures are built once.
PYTEST_WORKERS ?= 2

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS) tests

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/quantize.py --json
	HF_HUB_OFFLINE=1 $(PY) bench/align.py --json
	HF_HUB_OFFLINE=1 $(PY) bench/pipeline.py --json
	HF_HUB_OFFLINE=1 $(PY) bench/ranker.py --json
	HF_HUB_OFFLINE=1 $(PY) bench/store.py --json

clean:
	rm -rf $(VENV) build *.egg-info $(OUT)
