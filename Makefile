# sae_cache: `make demo` caches the embedded demo model offline; `make test` runs the test suite.
# A GPU user picks their own torch build: make install TORCH_SPEC="torch==2.5.1" (or TORCH_SPEC= to keep the one installed).
# `make demo` installs the package alone; `make install` and `make test` add the test extra (pytest, sae-lens, hypothesis).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_OUT ?= activations/demo

.PHONY: install package test demo bench clean

install: $(VENV)/.installed

package: $(VENV)/.package

$(VENV)/.package: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed: $(VENV)/.package
	$(PY) -m pip install -e ".[test]" --config-settings editable_mode=compat
	touch $@

test: install
	$(PY) -m pytest -q

demo: package
	$(PY) -m sae_cache --overwrite true --context_size 128 --new_cached_activations_path $(DEMO_OUT)

bench: install
	$(PY) -m benchmark.run_all

clean:
	rm -rf $(VENV) build *.egg-info
