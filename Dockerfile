# Stage 1: the PyInstaller CNI binary (onedir), built from the same sources.
FROM python:3.11-slim-bookworm AS cni
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cni_plugin cni_plugin
COPY felix_agent felix_agent
COPY deploy/build-cni.sh deploy/cni_entry.py deploy/
RUN pip install --no-cache-dir . pyinstaller==6.22.3 \
 && PY=python bash deploy/build-cni.sh

# Stage 2: the agent with bird2, iptables (legacy and nft), ipset and iproute2.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      bird2 iptables ipset iproute2 conntrack kmod \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cni_plugin cni_plugin
COPY felix_agent felix_agent
RUN pip install --no-cache-dir . && rm -rf /src
COPY --from=cni /src/dist/tortie-cni /opt/tortie/cni
COPY deploy/install-cni.sh deploy/uninstall-node.sh /opt/tortie/
ENTRYPOINT []
CMD ["tortie-agent"]
