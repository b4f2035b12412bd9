"""Which iptables backend (legacy xtables or nf_tables) the node already uses.

Two backends on one node each see only their own rules, and both run in the kernel: if
kube-proxy writes nft rules and we wrote legacy ones, packets would cross both rule sets
in an order nobody chose.  So, like Felix, we look at what is already there: count the
rules each backend's `*-save` shows (IPv4 and IPv6) and join the one holding more.  An
empty node (or a tie) gets the platform default, nft on Debian 12.  Config can force one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from felix_agent.dataplane.cmd import CommandError, CommandNotFound, have_command, run

Backend = Literal["nft", "legacy"]
BACKENDS: tuple[Backend, ...] = ("nft", "legacy")
CONFIG_VALUES = ("auto", "nft", "legacy")
DEFAULT_BACKEND: Backend = "nft"


class BackendError(RuntimeError):
    pass


def command(backend: str, verb: Literal["save", "restore"], ip_version: int = 4) -> str:
    """The executable name, e.g. command("legacy", "save", 6) == "ip6tables-legacy-save"."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown iptables backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if ip_version not in (4, 6):
        raise BackendError(f"ip_version must be 4 or 6, not {ip_version!r}")
    base = "iptables" if ip_version == 4 else "ip6tables"
    return f"{base}-{backend}-{verb}"


def require_backend(backend: str, ip_version: int = 4) -> None:
    """Raise a BackendError naming the missing command when `backend` cannot be used."""
    missing = [c for c in (command(backend, "save", ip_version), command(backend, "restore", ip_version))
               if not have_command(c)]
    if missing:
        raise BackendError(f"iptables backend {backend!r} is not available: missing "
                           f"{', '.join(missing)} (apt package iptables)")


def count_rules(save_output: str) -> int:
    """Rules in `*-save` output: lines starting "-A" (with or without a "[p:b] " counter)."""
    n = 0
    for line in save_output.splitlines():
        if line.startswith("-A ") or (line.startswith("[") and "] -A " in line):
            n += 1
    return n


@dataclass(frozen=True)
class Detection:
    backend: Backend
    reason: str
    counts: dict[str, int]


def _rules_in(backend: Backend, netns: str | None) -> int | None:
    """Rule count of one backend over IPv4 and IPv6; None when its save tool is absent."""
    total = 0
    seen = False
    for v in (4, 6):
        cmd = command(backend, "save", v)
        if not have_command(cmd):
            continue
        seen = True
        try:
            total += count_rules(run([cmd], netns=netns).stdout)
        except CommandNotFound:
            continue
        except CommandError:
            # e.g. the legacy ip6 tables module is missing: that family holds no rules.
            continue
    return total if seen else None


def detect(netns: str | None = None, configured: str = "auto",
           default: Backend = DEFAULT_BACKEND) -> Detection:
    """Pick the backend for the namespace `netns` (None = ours).

    configured "nft"/"legacy" wins (after checking its tools exist); "auto" counts rules.
    """
    if configured not in CONFIG_VALUES:
        raise BackendError(f"iptables backend must be one of {', '.join(CONFIG_VALUES)}, not {configured!r}")
    if configured != "auto":
        require_backend(configured)
        return Detection(configured, "configured", {})  # type: ignore[arg-type]
    counts: dict[str, int] = {}
    for b in BACKENDS:
        c = _rules_in(b, netns)
        if c is not None:
            counts[b] = c
    if not counts:
        raise BackendError("no iptables backend available: missing iptables-nft-save and "
                           "iptables-legacy-save (apt package iptables)")
    if len(counts) == 1:
        only = next(iter(counts))
        require_backend(only)  # type: ignore[arg-type]
        return Detection(only, "the only backend installed", counts)  # type: ignore[arg-type]
    if counts["legacy"] > counts["nft"]:
        return Detection("legacy", "legacy holds more rules", counts)
    if counts["nft"] > counts["legacy"]:
        return Detection("nft", "nft holds more rules", counts)
    require_backend(default)
    return Detection(default, "no rules yet (or a tie): platform default", counts)


def detect_backend(netns: str | None = None, configured: str = "auto",
                   default: Backend = DEFAULT_BACKEND) -> Backend:
    """Just the name: "nft" or "legacy"."""
    return detect(netns, configured, default).backend
