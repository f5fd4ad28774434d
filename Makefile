# The two commands of the README's Quick start; each does all its own set-up on a fresh machine.
#   make train   the main job on the embedded default (the toy world): reward service + 2 actors + learner
#   make test    the test suite (what .ci/run runs)
# Set-up, once per checkout: a virtualenv in $(VENV), PyTorch first ($(TORCH): on a CPU-only machine pip takes
# the CPU build), then the project with its dev extra; for the tests also Debian's Chromium (the browser test
# drives /usr/bin/chromium; installed with apt-get when run as root, else that one test is skipped, with the
# reason). Pass arguments through ARGS, e.g.
#   make train ARGS="learner.max_steps=200"      make test ARGS="-x tests/test_golden.py"

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup chromium train test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null); } \
	  || echo "no chromium (install Debian's chromium package): the browser test will be skipped"

train: setup
	$(PY) launch.py train $(ARGS)

# pytest exits 5 when it collects no test: not a failure here (a narrowed ARGS may select none)
test: setup chromium
	@$(PY) -m pytest $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc
