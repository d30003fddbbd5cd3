# The two commands of the README's Quick start. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so pip takes the local CPU build instead of pulling a multi-GB CUDA build.
# k-diffusion without its dependencies: its package __init__ needs torchvision & co; the tests use sampling.py only.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install --no-deps k-diffusion==0.1.1.post1 openai-clip==1.0.1 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/python -c "import minisd, torch, diffusers, transformers, importlib.util as u; assert u.find_spec('k_diffusion') and u.find_spec('clip')"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

demo: $(STAMP)
	@echo "The bundled demo model is not shipped yet (see README)."; exit 1

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
