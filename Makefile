# The two commands of the README's Quick start. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
QUIET := 2>&1 | grep -v "^WARNING: Location" || true
DEMO_PROMPT ?= a red circle on the left, blue background

.PHONY: test demo install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so pip takes the local CPU build instead of pulling a multi-GB CUDA build.
$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	$(PIP) install torch==2.13.0 $(QUIET)
	$(PIP) install -e . $(QUIET)
	$(VENV)/bin/python -c "import minisd, torch"
	touch $@

# The reference packages for the tests. k-diffusion and openai-clip without their dependencies: their package
# __init__ files want torchvision & co; the tests load the single files they need.
$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -e '.[test]' $(QUIET)
	$(PIP) install --no-deps k-diffusion==0.1.1.post1 openai-clip==1.0.1 $(QUIET)
	$(VENV)/bin/python -c "import diffusers, transformers, importlib.util as u; assert u.find_spec('k_diffusion') and u.find_spec('clip')"
	touch $@

install: $(VENV)/.test

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest -q

demo: $(VENV)/.runtime
	$(VENV)/bin/minisd generate "$(DEMO_PROMPT)" --seed 1 --outdir outputs/demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
