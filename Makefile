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
# make e2e / kube-up: a real Kubernetes built from Debian's source package (deploy/kube/build.sh)
# (command:package, as APT_TOOLS; libc6-dev has no command but the static builds need it;
# curl, wget, nc.openbsd and dash go into the agnhost image with their libraries, tests/kube/images.py)
KUBE_TOOLS := go:golang-go dpkg-source:dpkg-dev containerd:containerd ctr:containerd runc:runc \
              busybox:busybox-static gcc:gcc openssl:openssl nsenter:util-linux unshare:util-linux \
              curl:curl wget:wget nc.openbsd:netcat-openbsd dash:dash ldd:libc-bin hostname:hostname
KUBE_APT := $(sort $(foreach t,$(KUBE_TOOLS),$(lastword $(subst :, ,$(t)))) libc6-dev)

# make image without a docker engine: podman and buildah (no daemon; runc: crun refuses hybrid cgroups), debootstrap for the
# base image when no registry is reachable (deploy/base-image.sh); not needed by the tests.
IMAGE_TOOLS := podman:podman buildah:buildah debootstrap:debootstrap runc:runc
IMAGE_APT_PACKAGES := $(sort $(foreach t,$(IMAGE_TOOLS),$(lastword $(subst :, ,$(t)))))

.PHONY: deps test unit integration bench chaos demo demo-down cni-binary image image-deps clean e2e e2e-manifest kube-deps kube-up kube-down

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

kube-deps: deps
	@missing=""; for t in $(KUBE_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "kube-deps: installing apt packages (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(KUBE_APT) >/dev/null; \
	fi
	bash deploy/kube/build.sh >/dev/null

# tortie under a real Kubernetes v1.20.2 in network namespaces (root): our checks, then
# the upstream e2e specs (tests/kube/upstream.py; E2E_UPSTREAM=smoke|netpol|pods|services|hostport|network|none,
# or a comma list such as pods,services,hostport)
E2E_UPSTREAM ?= netpol
e2e: kube-deps cni-binary
	@# the cluster's prefix is chosen here so that it is removed even if pytest is killed
	@p=tk$$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n'); set -x; \
	KUBE_LAB_PREFIX=$$p E2E_UPSTREAM=$(E2E_UPSTREAM) $(PY) -m pytest -q -s -p no:cacheprovider $(PYTEST_ARGS) tests/kube; \
	rc=$$?; $(PY) -m tests.kube.cluster down $$p >/dev/null; exit $$rc

# the same cluster with tortie installed ONLY by kubectl apply -f manifests/tortie.yaml (the
# image from make image in each node's containerd), upgraded, the upstream specs run
# (E2E_UPSTREAM as for e2e) and uninstalled by its manifests
e2e-manifest: kube-deps image
	@p=tm$$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n'); set -x; \
	TORTIE_E2E_MANIFEST=1 TORTIE_KUBE_PREFIX=$$p E2E_UPSTREAM=$(E2E_UPSTREAM) $(PY) -m pytest -q -s -p no:cacheprovider $(PYTEST_ARGS) tests/kube/test_manifest_install.py; \
	rc=$$?; $(PY) -m tests.kube.manifest_lab down $$p >/dev/null; exit $$rc

kube-up: kube-deps cni-binary
	$(PY) -m tests.kube.cluster up $(if $(DUAL_STACK),--dual-stack)

kube-down:
	@if [ -x $(PY) ]; then $(PY) -m tests.kube.cluster down; else python3 -m tests.kube.cluster down; fi

dist/tortie: $(wildcard cni_plugin/*.py podnet/*.py) deploy/build-cni.sh deploy/cni_entry.py
	bash deploy/build-cni.sh

image: image-deps
	bash deploy/build-image.sh

# Installs the image tools only where no docker engine answers and one of them is missing.
image-deps:
	@if ! { command -v docker >/dev/null && docker info >/dev/null 2>&1; }; then \
	  missing=""; for t in $(IMAGE_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t%%:*}"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "image-deps: installing apt packages (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(IMAGE_APT_PACKAGES) >/dev/null; \
	  fi; \
	fi

clean:
	rm -rf build dist *.spec $(VENV)
