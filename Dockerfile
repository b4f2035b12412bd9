# tortie's node image: the agent, BIRD, iptables/ipset tools and the CNI bundle.
# Builds with docker, podman or buildah (`make image`, deploy/build-image.sh).  Where no
# registry is reachable, deploy/base-image.sh makes the base image from Debian packages.
ARG BASE=python:3.11-slim-bookworm

# Stage 1: everything that needs build tools.  The agent and its dependencies go into a
# virtualenv that the final stage copies whole; the PyInstaller CNI bundle is built from
# the same sources.  Neither binutils, PyInstaller nor pip reaches the final image.
FROM ${BASE} AS build
# PyInstaller needs objdump (binutils), which the slim image lacks.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cni_plugin cni_plugin
COPY podnet podnet
COPY felix_agent felix_agent
COPY tortiectl tortiectl
COPY deploy/build-cni.sh deploy/cni_entry.py deploy/
# The kubernetes client ships an asyncio copy of itself (68 MB): the agent uses the sync one
# (the import check below fails the build if that changes).
RUN python3 -m venv /opt/tortie/venv \
 && /opt/tortie/venv/bin/pip install --no-cache-dir . pyinstaller==6.22.3 \
 && PY=/opt/tortie/venv/bin/python bash deploy/build-cni.sh \
 && /opt/tortie/venv/bin/pip uninstall -y -q pyinstaller pyinstaller-hooks-contrib altgraph \
 && SP=$(/opt/tortie/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && rm -rf "$SP/kubernetes/aio" \
 && /opt/tortie/venv/bin/python -c 'import felix_agent.agent.main, felix_agent.datastore.kubernetes, tortiectl.cli' \
 && /opt/tortie/venv/bin/pip uninstall -y -q pip setuptools

# Stage 2: the agent with bird2, iptables (legacy and nft), ipset, iproute2, conntrack.
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      bird2 iptables ipset iproute2 conntrack kmod \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
COPY --from=build /opt/tortie/venv /opt/tortie/venv
COPY --from=build /src/dist/tortie-cni /opt/tortie/cni
COPY deploy/install-cni.sh deploy/uninstall-node.sh /opt/tortie/
ENV PATH=/opt/tortie/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT []
CMD ["tortie-agent"]
