# tortie — every target works as root on a fresh Debian machine; `make test` and
# `make demo` install what they need first (deps is idempotent and quick when done).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := iptables ipset iproute2 bird2 etcd-server containernetworking-plugins \
                iperf3 conntrack iputils-ping tcpdump procps psmisc
# the commands those packages provide; apt runs only when one is missing
APT_TOOLS := iptables ipset ip bird birdc etcd iperf3 conntrack ping tcpdump pkill
PYTEST_ARGS ?=
# make e2e / kube-up: a real Kubernetes built from Debian's source package (deploy/kube/build.sh)
KUBE_APT := golang-go dpkg-dev containerd runc busybox-static gcc libc6-dev openssl util-linux
KUBE_TOOLS := go dpkg-source containerd runc ctr busybox gcc openssl nsenter

.PHONY: deps test unit integration bench demo demo-down cni-binary image clean e2e kube-deps kube-up kube-down

deps: $(VENV)/.installed
	@missing=""; for t in $(APT_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	[ -x /usr/lib/cni/host-local ] || missing="$$missing host-local"; \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing apt packages (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	@command -v python3 >/dev/null || (apt-get update -qq && apt-get install -y -qq python3 python3-venv)
	@# Debian's python3 needs python3-venv for ensurepip; install it only when venv fails.
	@test -x $(PY) || python3 -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-dev >/dev/null \
	  && python3 -m venv $(VENV); }
	@echo "deps: installing the python packages into $(VENV)"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

test: deps
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/unit tests/integration

unit: deps
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/unit

bench: deps cni-binary
	@set -e; for b in tests/bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

demo: deps cni-binary
	$(PY) deploy/demo.py up

demo-down:
	@if [ -x $(PY) ]; then $(PY) deploy/demo.py down; else python3 deploy/demo.py down; fi

cni-binary: deps dist/tortie

kube-deps: deps
	@missing=""; for t in $(KUBE_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "kube-deps: installing apt packages (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(KUBE_APT) >/dev/null; \
	fi
	bash deploy/kube/build.sh >/dev/null

# tortie under a real Kubernetes v1.20.2 in network namespaces (root): our checks, then
# the upstream e2e specs (tests/kube/upstream.py; E2E_UPSTREAM=smoke|full|none)
E2E_UPSTREAM ?= netpol
e2e: kube-deps cni-binary
	@# the cluster's prefix is chosen here so that it is removed even if pytest is killed
	@p=tk$$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n'); set -x; \
	KUBE_LAB_PREFIX=$$p E2E_UPSTREAM=$(E2E_UPSTREAM) $(PY) -m pytest -q -s -p no:cacheprovider $(PYTEST_ARGS) tests/kube; \
	rc=$$?; $(PY) -m tests.kube.cluster down $$p >/dev/null; exit $$rc

kube-up: kube-deps cni-binary
	$(PY) -m tests.kube.cluster up

kube-down:
	@if [ -x $(PY) ]; then $(PY) -m tests.kube.cluster down; else python3 -m tests.kube.cluster down; fi

dist/tortie: $(wildcard cni_plugin/*.py) deploy/build-cni.sh deploy/cni_entry.py
	bash deploy/build-cni.sh

image:
	bash deploy/build-image.sh

clean:
	rm -rf build dist *.spec $(VENV)
