# flannel-bpf: `make demo` and `make test` take a fresh Debian 12 machine (as root) all the way.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint unit demo demo-down clean help bench test-vagrant vagrant-up vagrant-down

help:
	@echo "make test       install what is missing, then ruff, mypy and the whole test suite"
	@echo "make bench      every benchmark, side by side; writes docs/benchmarks.md (BENCH_ARGS=--quick)"
	@echo "make test-vagrant  boot the Vagrant lab (etcd + 3 VMs, libvirt/QEMU), check it, destroy it"
	@echo "make vagrant-up / vagrant-down  the same Vagrant lab, left running to look at"
	@echo "make demo       install what is missing, then etcd and an agent in namespaces"
	@echo "make demo KUBE=1  the same on a Kubernetes control plane, agents in kube mode"
	@echo "make demo-down  remove everything the demo made"

setup:
	@bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check flannel_bpf tests bench dashboards
	$(VENV)/bin/ruff format --check flannel_bpf tests bench dashboards
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The Vagrant lab booted for real: box built (or reused from /var/cache/flannel-bpf/vagrant),
# libvirtd in its own network namespace, vagrant up, checks from this host, vagrant destroy.
# Prints the time of each phase. FLANNEL_BPF_WORKERS is not read here: the suite boots 3.
test-vagrant: setup
	@bash scripts/setup.sh --vm-host
	FLANNEL_BPF_VAGRANT=1 $(PY) -m pytest tests/vagrant -s -p no:cacheprovider $(PYTEST_ARGS) -o timeout=1800

# The same lab left running to look at: flannel-bpf vagrant status|ssh NODE [-- CMD].
vagrant-up: setup
	@bash scripts/setup.sh --vm-host
	$(PY) -m flannel_bpf vagrant up

vagrant-down:
	@if [ -x $(PY) ]; then $(PY) -m flannel_bpf vagrant down; fi

# KUBE=1: the Kubernetes lab (kube-apiserver, node IPAM, agents in --kube-subnet-mgr mode).
demo: setup
	$(PY) -m flannel_bpf.lab.demo up $(if $(KUBE),--kube)

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

demo-down:
	@if [ -x $(PY) ]; then $(PY) -m flannel_bpf.lab.demo down; fi

clean: demo-down
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
