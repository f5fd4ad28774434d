# The two commands of the README's Quick start; each does all its own set-up on a fresh machine.
#   make train       the main job on the embedded default (the toy world): reward service + 2 actors + learner
#   make test        the whole test suite (what .ci/run runs), with the 25 slowest tests listed at the end
#   make docs        docs/configuration.md regenerated from the config schema (after changing core/config.py)
#   make test-fast   the tier to run while working: no whole jobs, no rollout actors, no second Ray cluster, no
#                    browser, no torch.compile (pytest markers job, actors, own_ray, browser, compile; see
#                    pyproject.toml)
# Set-up, once per checkout: a virtualenv in $(VENV), PyTorch first ($(TORCH): on a CPU-only machine pip takes
# the CPU build), then the project with its dev extra, then DeepSpeed's shared-memory communication op, which
# DeepSpeed otherwise compiles inside the first process that joins a group. `make test` also needs Debian's
# Chromium (the browser tests drive /usr/bin/chromium) and a C++ compiler (torch.compile's CPU backend): it
# installs them with apt-get when run as root, and stops with what to install otherwise. Pass arguments
# through ARGS, e.g.
#   make train ARGS="learner.max_steps=200"      make test ARGS="-x tests/test_golden.py"

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
ARGS ?=
FAST := not job and not actors and not own_ray and not browser and not compile

.PHONY: setup system-deps train test test-fast docs gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" 2>&1 | grep -v WARNING || true
	touch $@

# Chromium and a C++ compiler, from Debian's packages when missing; a machine that cannot install them fails
# here, by name, rather than skipping the tests that need them.
system-deps:
	@missing=""; command -v chromium >/dev/null || missing="chromium"; \
	  command -v g++ >/dev/null || command -v c++ >/dev/null || missing="$$missing g++"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	        || { echo "could not install $$missing with apt-get"; exit 1; }; \
	    else echo "make test needs: $$missing (Debian packages; install them, or run make test-fast)"; exit 1; fi; \
	  fi

train: setup
	$(PY) launch.py train $(ARGS)

# pytest exits 5 when it collects no test: not a failure here (a narrowed ARGS may select none)
test: setup system-deps
	@$(PY) -m pytest --durations=25 $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

test-fast: setup
	@$(PY) -m pytest -m "$(FAST)" $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

# docs/configuration.md, the reference of every config key, written from the pydantic schema (core/config.py,
# toyworld/config.py) by docs/gen_config_reference.py; tests/test_docs.py fails until it is rerun after a schema change.
docs: setup
	$(PY) docs/gen_config_reference.py

# The wheels benchmarks/gpu_check.sh installs on a GPU machine without network (benchmarks/gpu_requirements.txt,
# as CPython 3.12 manylinux x86-64 wheels, into .whl/), then the size of what such a machine is sent: the working
# tree (tracked and untracked, not ignored) plus the wheels, against GPU_TREE_MIB.
GPU_TREE_MIB ?= 64
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any
gpu-wheels: setup
	rm -rf .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(foreach p,$(GPU_PLATFORMS),--platform $(p)) -d .whl -r benchmarks/gpu_requirements.txt
	@tree=$$(git ls-files -z -co --exclude-standard | xargs -0 cat | wc -c); wheels=$$(cat .whl/*.whl | wc -c); \
	  total=$$((tree + wheels)); \
	  echo "working tree $$((tree / 1024)) KiB + wheels $$((wheels / 1024)) KiB = $$((total / 1048576)) MiB of $(GPU_TREE_MIB)"; \
	  [ $$total -le $$(($(GPU_TREE_MIB) * 1048576)) ] || { echo "over $(GPU_TREE_MIB) MiB: carry less"; exit 1; }
