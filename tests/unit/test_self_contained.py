"""The repository holds everything its tests need: the recorded Kubernetes API responses
live in tests/fixtures/k8s-api, and no test, fake, lab helper, demo or bench reaches for a
`shared` directory beside the checkout (a fresh clone has none)."""
from __future__ import annotations

import os
import re

from tests.fakes import apiserver

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_fake_apiserver_reads_the_repository_copy():
    assert os.path.realpath(apiserver.DATA_DIR) == os.path.join(ROOT, "tests", "fixtures", "k8s-api")
    for res in apiserver.RESOURCES.values():
        for name in filter(None, (res.list_file, res.watch_file)):  # CRD resources have none
            assert os.path.isfile(os.path.join(apiserver.DATA_DIR, name)), name
    assert os.path.isfile(os.path.join(apiserver.DATA_DIR, "README.md"))


def test_nothing_reads_a_shared_directory_beside_the_checkout():
    pattern = re.compile(r"""\.\./shared|["']shared["']""")
    paths = [os.path.join(ROOT, "Makefile")]
    for top in ("tests", "deploy", "felix_agent", "cni_plugin", "podnet", "tortiectl", ".ci"):
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, top)):
            paths += [os.path.join(dirpath, fn) for fn in files if fn.endswith((".py", ".sh")) or top == ".ci"]
    hits = []
    for path in paths:
        if path == os.path.abspath(__file__):
            continue
        for n, line in enumerate(open(path, errors="replace"), 1):
            if pattern.search(line):
                hits.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not hits, hits
