"""The packages are the pipeline's stages and imports point one way (ARCHITECTURE.md):

    podnet  <-  base (felix_agent.model/config/logs/metrics)  <-  datastore  <-  ipam
                                                    base  <-  calc  <-  dataplane
    agent wires them all; tortiectl reads the datastore and runs the calc; the CNI binary
    (cni_plugin) uses podnet only, and nothing imports the binary's package.

Every import counts, function-level ones included (a lazy import is still a dependency).
The module graph of the product must also be free of cycles."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRODUCT = ("podnet", "cni_plugin", "felix_agent", "tortiectl")
BASE = {"felix_agent", "felix_agent.model", "felix_agent.config", "felix_agent.logs", "felix_agent.metrics",
        "felix_agent.tasks"}

# Which stages a stage may import (itself included).
ALLOWED = {
    "podnet": {"podnet"},
    "cni_plugin": {"podnet", "cni_plugin"},
    "base": {"podnet", "base"},
    "datastore": {"podnet", "base", "datastore"},
    "ipam": {"podnet", "base", "datastore", "ipam"},
    "calc": {"podnet", "base", "calc"},
    "dataplane": {"podnet", "base", "calc", "dataplane"},
    "agent": {"podnet", "base", "datastore", "ipam", "calc", "dataplane", "agent"},
    "tortiectl": {"podnet", "base", "datastore", "calc", "tortiectl"},
}


def stage(module: str) -> str | None:
    top = module.split(".")[0]
    if top not in PRODUCT:
        return None
    if top != "felix_agent":
        return top
    if module in BASE:
        return "base"
    part = module.split(".")[1]
    if part in ALLOWED:
        return part
    raise AssertionError(f"{module}: a felix_agent module outside every stage; place it in one")


def product_modules() -> dict[str, str]:
    """module name -> file path, for every product module."""
    found = {}
    for top in PRODUCT:
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, top)):
            for fn in files:
                if fn.endswith(".py"):
                    path = os.path.join(dirpath, fn)
                    mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[mod.removesuffix(".__init__")] = path
    return found


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """The product modules `module` imports: `from pkg import sub` names the submodule."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if stage(m) is not None}


def graph() -> dict[str, set[str]]:
    mods = product_modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, dsts in edges.items():
        for dst in dsts:
            if stage(dst) not in ALLOWED[stage(src)]:
                bad.append(f"{src} ({stage(src)}) imports {dst} ({stage(dst)})")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]; counter[0] += 1
                    stack.append(nxt); on.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop(); on.discard(m); comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_every_import_points_to_an_earlier_stage():
    assert violations(graph()) == []


def test_the_product_has_no_import_cycle():
    # A package's __init__ importing its own submodules is not a cycle worth naming.
    edges = {m: {d for d in ds if not m.startswith(d + ".") and d != m} for m, ds in graph().items()}
    assert cycles(edges) == []


def test_the_checks_catch_what_they_guard():
    """Both checks fail on the mistakes they exist for (so the two tests above can fail)."""
    assert violations({"felix_agent.calc.filter": {"felix_agent.dataplane.iptables"}})
    assert violations({"felix_agent.agent.loop": {"cni_plugin.main"}})
    assert violations({"podnet.plumbing": {"felix_agent.model"}})
    assert not violations({"felix_agent.dataplane.iptables": {"felix_agent.calc.desired", "podnet.naming"}})
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    edges = graph()
    # cni_plugin.commands imports ipam_exec inside functions only.
    assert "cni_plugin.ipam_exec" in edges["cni_plugin.commands"]
    assert "podnet.naming" in edges["felix_agent.calc.filter"]
