"""`make deps` installs every outside command the code runs: the Makefile's APT_TOOLS
(command:Debian-package pairs) against the commands the product, the tests, the demo and the
benches execute, found by reading their source (subprocess/Popen/posix_spawn/shutil.which and
the lab's exec helpers with a literal argv). A command the code runs that the Makefile does not
install fails here with its name and package, before it fails a test on a fresh machine."""
from __future__ import annotations

import ast
import fnmatch
import os
import re
import shutil
import subprocess

from felix_agent.dataplane.cmd import PACKAGES as AGENT_PACKAGES
from tests.lab.tools import TOOLS as LAB_TOOLS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCANNED = ("felix_agent", "cni_plugin", "tests", "deploy")

# Calls whose first list/tuple argument is an argv, and calls whose first string
# arguments are an argv (the lab's sh(...), lab.exec(ns, ...), kernel_has's ns_exec).
ARGV_LIST_CALLS = {"run", "Popen", "check_output", "check_call", "call", "popen", "posix_spawn",
                   "execv", "execvp"}
ARGV_VARARG_CALLS = {"sh", "ns_exec", "create_subprocess_exec", "which", "have_command"}
ARGV_AFTER_NS_CALLS = {"exec"}  # lab.exec(ns, *argv)
# Commands every Debian system has (Essential packages, shell builtins), what runs `make`
# itself, and tortie's own programs.
NOT_APT = {"sh", "bash", "cat", "echo", "sleep", "readlink", "true", "false", "exit", "env",
           "kill", "ls", "mkdir", "rm", "dpkg", "python3", "make", "tortie", "tortiectl", "tortie-agent",
           "iptables-frob-save",  # a test that a missing command is named
           "docker", "umount"}  # docker: an engine used only when one runs; umount: essential (mount)


def makefile_pairs(var: str) -> dict[str, str]:
    """A Makefile variable of name:package words (continuation lines joined)."""
    text = open(os.path.join(ROOT, "Makefile")).read().replace("\\\n", " ")
    m = re.search(rf"^{var}\s*:=(.*)$", text, re.M)
    assert m, f"the Makefile has no {var} := line"
    return dict(w.split(":", 1) for w in m.group(1).split())


def _argv_heads(elts: list[ast.expr]) -> list[str | ast.JoinedStr]:
    """The command an argv runs, plus the one behind `ip netns exec NS` or `sh -c "..."`."""
    vals = [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else e for e in elts]
    if not vals or not isinstance(vals[0], (str, ast.JoinedStr)):
        return []
    heads = [vals[0]]
    if vals[:3] == ["ip", "netns", "exec"] and len(vals) > 4 and isinstance(vals[4], str):
        heads.append(vals[4])
    if vals[0] in ("sh", "bash") and vals[1:2] == ["-c"] and len(vals) > 2 and isinstance(vals[2], str):
        heads.append(vals[2].split()[0])
    return heads


def executed_commands() -> dict[str, list[str]]:
    """command name (or an f-string's glob, e.g. 'iptables-*-save') -> where it is run."""
    found: dict[str, list[str]] = {}
    for top in SCANNED:
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, top)):
            for fn in files:
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fn)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if not isinstance(node, ast.Call):
                        continue
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                    heads = []
                    if name in ARGV_LIST_CALLS:
                        lists = [a for a in node.args if isinstance(a, (ast.List, ast.Tuple))]
                        heads = _argv_heads(lists[0].elts) if lists else []
                    elif name in ARGV_VARARG_CALLS:
                        heads = _argv_heads(node.args)
                    elif name in ARGV_AFTER_NS_CALLS:
                        heads = _argv_heads(node.args[1:])
                    for h in heads:
                        if isinstance(h, ast.JoinedStr):
                            h = "".join(v.value if isinstance(v, ast.Constant) else "*" for v in h.values)
                        if h.startswith("-") or "/" in h or not h.strip("*"):
                            continue  # an option after a computed program, or a path of ours
                        found.setdefault(h, []).append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    return found


def debian_package(cmd: str) -> str:
    """Which Debian package ships `cmd`, as far as this machine can tell."""
    known = {**LAB_TOOLS, **AGENT_PACKAGES}
    if cmd in known:
        return known[cmd]
    path = shutil.which(cmd)
    if path and shutil.which("dpkg"):
        p = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True, text=True)
        if p.returncode == 0:
            return p.stdout.split(":")[0]
    return f"unknown here: find it with `apt-file search bin/{cmd}`"


def test_the_scan_finds_what_the_code_is_known_to_run():
    """The scan itself works: these calls exist today in the places named."""
    found = executed_commands()
    for cmd in ("ip", "ipset", "etcdctl", "etcd", "iperf3", "conntrack", "ping", "bird"):
        assert cmd in found, f"the scan no longer sees {cmd!r}: fix executed_commands()"
    assert any(fnmatch.fnmatch("iptables-nft-save", k) for k in found if "*" in k)


def test_makefile_installs_every_command_the_code_runs():
    # make deps (APT_TOOLS) serves make test; kube-deps and image-deps serve make e2e/kube-up
    # and make image, which install their own lists
    tools = {**makefile_pairs("APT_TOOLS"), **makefile_pairs("KUBE_TOOLS"), **makefile_pairs("IMAGE_TOOLS")}
    missing = []
    for cmd, where in sorted(executed_commands().items()):
        if cmd in NOT_APT:
            continue
        if "*" in cmd:  # an f-string: some listed command must fit it
            if not any(fnmatch.fnmatch(t, cmd) for t in tools):
                missing.append(f"{cmd} (run at {where[0]}; no APT_TOOLS entry fits it)")
        elif cmd not in tools:
            missing.append(f"{cmd} (apt package {debian_package(cmd)}; run at {where[0]})")
    # what the agent and the lab look up by name must be installed as well
    for cmd in {**AGENT_PACKAGES, **LAB_TOOLS}:
        if cmd not in tools and not any(m.startswith(f"{cmd} ") for m in missing):
            missing.append(f"{cmd} (apt package {debian_package(cmd)}; named in the agent's/lab's tool table)")
    assert not missing, ("the Makefile's APT_TOOLS does not install: " + "; ".join(missing)
                         + " -- add command:package to APT_TOOLS")


def test_makefile_packages_match_the_code_tables_and_nothing_is_stale():
    tools = makefile_pairs("APT_TOOLS")
    for cmd, pkg in {**AGENT_PACKAGES, **LAB_TOOLS}.items():
        assert tools.get(cmd, pkg) == pkg, f"{cmd}: Makefile says {tools[cmd]}, the code's table says {pkg}"
    run = executed_commands()
    used = set(run) | set(AGENT_PACKAGES) | set(LAB_TOOLS)
    stale = [t for t in tools if t not in used and not any(fnmatch.fnmatch(t, k) for k in used if "*" in k)]
    assert not stale, f"the Makefile installs commands nothing runs any more: {stale}"


def test_makefile_files_are_the_reference_cni_plugins():
    files = makefile_pairs("APT_FILES")
    assert files and all(p == "containernetworking-plugins" for p in files.values())
    used = {n for n in ("host-local", "portmap", "ptp")}
    assert {os.path.basename(f) for f in files} == used
