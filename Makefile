# The two set-up commands of the README: `make demo` and `make test`. Both build .venv first.
# TORCH_SPEC pins the build this workplace keeps on disk; on a cluster pass your own, e.g.
#   make venv TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: venv demo test test-cluster gpu-deps bench clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The whole pipeline (prep, train, eval, report) on synthetic archives in the official shapes.
demo: venv
	$(PY) -m pipeline.prep.synthetic imagenet $(DEMO_DIR)/archives
	$(PY) launch.py --stage all --executor local --config configs/demo.toml \
		--archive-dir $(DEMO_DIR)/archives --data-dir $(DEMO_DIR)/data --run-dir $(DEMO_DIR)/run

test: venv test-cluster
	$(PY) -m pytest $(PYTEST_ARGS)

# The Slurm tests need Debian's slurm-wlm and munge (the tests start their two-node cluster themselves):
# installed here when missing and apt can run as root, as CI does; otherwise stop with the one command to run.
test-cluster:
	@if bash .ci/slurm/install.sh --check; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make test: installing Slurm and munge from Debian's packages for the Slurm tests (.ci/slurm/install.sh)"; \
		bash .ci/slurm/install.sh; \
	else \
		echo "make test: the Slurm tests need Slurm and munge; install them first with: sudo bash .ci/slurm/install.sh" >&2; \
		exit 2; \
	fi

clean-demo:
	rm -rf $(DEMO_DIR)

# What a lent GPU machine lacks (it has torch, torchvision, pandas, tabulate and the rest, and installs nothing):
# the pure-Python packages below, fetched here without building .venv, carried with the working tree for
# benchmarks/gpu_check.sh.
GPU_DEPS ?= tomli-w
gpu-deps:
	rm -rf .gpu-deps
	$(PYTHON) -m pip install -q --no-deps --target .gpu-deps $(GPU_DEPS)
