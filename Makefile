# The two commands of the README's Quick start. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
QUIET := 2>&1 | grep -v "^WARNING: Location" || true
DEMO_PROMPT ?= a red circle on the left, blue background

.PHONY: test demo docs fuzz install clean

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
	$(PIP) install -e '.[test,server,explain,ray]' $(QUIET)
	$(PIP) install --no-deps k-diffusion==0.1.1.post1 openai-clip==1.0.1 $(QUIET)
	$(VENV)/bin/python -c "import diffusers, transformers, importlib.util as u; assert u.find_spec('k_diffusion') and u.find_spec('clip')"
	@# The server's page test drives Debian's chromium; installed here only where it is missing and apt exists.
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; fi
	touch $@

install: $(VENV)/.test

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest -q

demo: $(VENV)/.runtime
	$(VENV)/bin/minisd generate "$(DEMO_PROMPT)" --seed 1 --outdir outputs/demo

# The figures of docs/how-it-works.md (the demo model, fixed seeds: the same files every time) and the docs'
# code links re-anchored to the lines that hold their text.
docs: $(VENV)/.runtime
	$(PIP) install -e '.[explain]' $(QUIET)
	$(VENV)/bin/python -m minisd.explain.figures docs/figures

# Every fuzz target (fuzz/) for FUZZ_SECONDS each; new corpus entries and crash inputs go to fuzz-work/, then a
# table: executions, time, corpus, line coverage of each target's modules, crash inputs. `make test` replays the
# corpora committed in fuzz/corpus/ and a fixed-seed burst.
FUZZ_SECONDS ?= 60
fuzz: $(VENV)/.test
	$(VENV)/bin/python fuzz/run.py --seconds $(FUZZ_SECONDS) --work fuzz-work; status=$$?; \
	$(VENV)/bin/python fuzz/report.py --work fuzz-work && exit $$status

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache fuzz-work
