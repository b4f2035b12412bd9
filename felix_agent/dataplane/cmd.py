"""Running the dataplane's outside commands (iptables-save/-restore, ipset), optionally
inside a named network namespace.

The agent runs inside the node's namespace in production and passes netns=None; tests and
benchmarks drive a lab namespace from the root namespace by name, which this module turns
into `ip netns exec <name> ...`.  Every failure becomes a CommandError that names the
command, its exit status and its stderr, so a driver can report exactly what the kernel
(or the tool) refused.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass

# The Debian package that ships each command we run, for "not installed" errors.
PACKAGES = {
    "ip": "iproute2",
    "ipset": "ipset",
    "iptables-legacy-save": "iptables", "iptables-legacy-restore": "iptables",
    "iptables-nft-save": "iptables", "iptables-nft-restore": "iptables",
    "ip6tables-legacy-save": "iptables", "ip6tables-legacy-restore": "iptables",
    "ip6tables-nft-save": "iptables", "ip6tables-nft-restore": "iptables",
}

DEFAULT_TIMEOUT = 60.0


class CommandError(RuntimeError):
    """A command failed (non-zero exit) or could not run at all."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str, netns: str | None = None):
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        self.netns = netns
        where = f" in netns {netns}" if netns else ""
        status = "could not run" if returncode is None else f"failed ({returncode})"
        super().__init__(f"{shlex.join(argv)}{where} {status}: {stderr.strip()}")


class CommandNotFound(CommandError):
    """The command is not installed; the message names it and its Debian package."""

    def __init__(self, name: str, netns: str | None = None):
        pkg = PACKAGES.get(name)
        hint = f" (apt package {pkg})" if pkg else ""
        super().__init__([name], None, f"command {name!r} not found{hint}", netns)
        self.name = name


@dataclass(frozen=True)
class Result:
    stdout: str
    stderr: str
    returncode: int


def have_command(name: str) -> bool:
    return shutil.which(name) is not None


def netns_exists(netns: str) -> bool:
    return os.path.exists(os.path.join("/var/run/netns", netns))


def wrap_argv(argv: list[str], netns: str | None) -> list[str]:
    """The argv that runs `argv` in `netns` (unchanged for the process's own namespace)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def run(argv: list[str], netns: str | None = None, input: str | None = None,
        check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Result:
    """Run argv (in `netns` when given) and return its output.

    The command is looked up first so a missing tool is reported by name rather than as
    `ip netns exec`'s generic exit status 255.  A missing namespace is refused up front
    too: `ip netns exec` would say so, but only after forking.
    """
    if not have_command(argv[0]):
        raise CommandNotFound(argv[0], netns)
    if netns is not None and not netns_exists(netns):
        raise CommandError(wrap_argv(argv, netns), None, f"network namespace {netns!r} does not exist", netns)
    full = wrap_argv(argv, netns)
    try:
        p = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise CommandError(full, None, f"timed out after {timeout}s", netns) from e
    except OSError as e:  # e.g. `ip` itself missing when netns is given
        raise CommandError(full, None, str(e), netns) from e
    if check and p.returncode != 0:
        raise CommandError(full, p.returncode, p.stderr or p.stdout, netns)
    return Result(p.stdout, p.stderr, p.returncode)
