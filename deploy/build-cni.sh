#!/usr/bin/env bash
# Builds the CNI binary with PyInstaller, onedir (a onefile bundle unpacks itself at
# every start, ~250 ms). dist/tortie is a symlink to the bundle's executable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
echo "cni-binary: building dist/tortie with PyInstaller (onedir)"
"$PY" -m PyInstaller --noconfirm --clean --log-level WARN --onedir --name tortie-cni \
  --distpath dist --workpath build/pyinstaller --specpath build \
  --exclude-module kubernetes --exclude-module aetcd \
  --exclude-module grpc --exclude-module yaml --exclude-module felix_agent \
  deploy/cni_entry.py
ln -sfn tortie-cni/tortie-cni dist/tortie
echo "cni-binary: dist/tortie -> $(readlink dist/tortie)"
