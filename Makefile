# tortie — every target works as root on a fresh Debian machine; `make test` and
# `make demo` install what they need first (deps is idempotent and quick when done).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# Every outside command the product, the tests, the demo and the benches run, as
# command:Debian-package; tests/unit/test_make_deps.py fails when the code and this list drift apart.
APT_TOOLS := ip:iproute2 ss:iproute2 bridge:iproute2 sysctl:procps ping:iputils-ping \
             iptables:iptables iptables-save:iptables iptables-restore:iptables iptables-legacy:iptables iptables-nft:iptables \
             iptables-legacy-save:iptables iptables-legacy-restore:iptables \
             iptables-nft-save:iptables iptables-nft-restore:iptables ip6tables-nft:iptables \
             ip6tables-legacy-save:iptables ip6tables-legacy-restore:iptables \
             ip6tables-nft-save:iptables ip6tables-nft-restore:iptables \
             ipset:ipset bird:bird2 birdc:bird2 etcd:etcd-server etcdctl:etcd-client \
             iperf3:iperf3 conntrack:conntrack ip6tables:iptables ip6tables-save:iptables \
             openssl:openssl setpriv:util-linux tcpdump:tcpdump
# files the tests and benches run that are not on PATH: Debian's reference CNI plugins
APT_FILES := /usr/lib/cni/host-local:containernetworking-plugins /usr/lib/cni/portmap:containernetworking-plugins \
             /usr/lib/cni/ptp:containernetworking-plugins
APT_PACKAGES := $(sort $(foreach t,$(APT_TOOLS) $(APT_FILES),$(lastword $(subst :, ,$(t)))))
PYTEST_ARGS ?=

.PHONY: deps test unit integration bench chaos demo demo-down cni-binary image clean

deps: $(VENV)/.installed
	@# apt runs only when a command or file is missing, and installs only the packages that ship them
	@have() { case $$1 in /*) [ -x $$1 ] ;; *) command -v $$1 >/dev/null ;; esac; }; \
	missing=""; for e in $(APT_TOOLS) $(APT_FILES); do have $${e%%:*} || missing="$$missing $$e"; done; \
	if [ -n "$$missing" ]; then \
	  pkgs=$$(for e in $$missing; do echo $${e##*:}; done | sort -u | tr '\n' ' '); \
	  echo "deps: installing apt packages $$pkgs(missing:$$(for e in $$missing; do printf ' %s' $${e%%:*}; done))"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null || exit 1; \
	  still=""; for e in $$missing; do have $${e%%:*} || still="$$still $${e%%:*} (apt package $${e##*:})"; done; \
	  if [ -n "$$still" ]; then echo "deps: still missing after apt-get install:$$still" >&2; exit 1; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	@command -v python3 >/dev/null || (apt-get update -qq && apt-get install -y -qq python3 python3-venv)
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "deps: tortie needs Python >= 3.11, this python3 is $$(python3 -V 2>&1) (Debian 12 'bookworm' has 3.11)" >&2; exit 1; }
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

# Faults under churn on the lab (root; not part of `make test`): CHAOS_MINUTES (default 10),
# CHAOS_SEED to rerun a schedule.
chaos: deps cni-binary
	$(PY) tests/chaos/chaos.py

demo: deps cni-binary
	$(PY) deploy/demo.py up

demo-down:
	@if [ -x $(PY) ]; then $(PY) deploy/demo.py down; else python3 deploy/demo.py down; fi

cni-binary: deps dist/tortie

dist/tortie: $(wildcard cni_plugin/*.py) deploy/build-cni.sh deploy/cni_entry.py
	bash deploy/build-cni.sh

image:
	bash deploy/build-image.sh

clean:
	rm -rf build dist *.spec $(VENV)
