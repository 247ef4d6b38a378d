# flannel-bpf: `make demo` and `make test` take a fresh Debian 12 machine (as root) all the way.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint unit demo demo-down clean help bench

help:
	@echo "make test       install what is missing, then ruff, mypy and the whole test suite"
	@echo "make bench      every benchmark, side by side; writes docs/benchmarks.md (BENCH_ARGS=--quick)"
	@echo "make demo       install what is missing, then etcd and an agent in namespaces"
	@echo "make demo-down  remove everything the demo made"

setup:
	@bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check flannel_bpf tests bench dashboards
	$(VENV)/bin/ruff format --check flannel_bpf tests bench dashboards
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m flannel_bpf.lab.demo up

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

demo-down:
	@if [ -x $(PY) ]; then $(PY) -m flannel_bpf.lab.demo down; fi

clean: demo-down
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
