"""Flow logs: NFLOG rules next to the policy verdicts, so the agent can say which policy
decided a packet (off unless CalcConfig.flow_logs is set; the chains are then unchanged).

Where a verdict is made, a rule with the same match goes just before it and hands the
packet's headers to NFLOG group `group` with a prefix "D:<id>" (denied) or "A:<id>"
(allowed), <id> naming (verdict, direction, tier, policy, rule index) in
DesiredState.flow_rules (NFLOG prefixes hold 64 characters; names do not fit):

- a cluster policy's Deny rule, logged before its DROP;
- the end of an endpoint's NetworkPolicy tier (no NetworkPolicy selecting the pod allowed
  the packet), logged before the endpoint chain's DROP, naming those NetworkPolicies;
- allows, sampled: before each rule that sets the accept mark (NetworkPolicy rules,
  cluster policy Accept rules), and at the end of an endpoint chain that falls through
  (a Pass or no tier rule matched, and no NetworkPolicy selects the pod: allowed).

Only a connection's first packets reach these chains (established traffic is accepted at
the top of FORWARD).  Every log rule is rate limited twice, so a flood costs the kernel
and the agent bounded work: per flow (hashlimit on source, destination and port, one
kernel table per verdict and rate) and per rule (limit).  Counts are therefore of logged packets.

Both families get the rules (iptables and ip6tables run the same cali- chains), with the
same ids: a rule's id names the policy rule, not the family.  The kernel keys a hashlimit
table by name and family, so equal names would not share one; the IPv6 names still differ
("cali-fl6-") so /proc/net/ip6t_hashlimit tells the families apart at a glance.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Iterable

from felix_agent.calc.desired import FlowRule
from felix_agent.calc.names import SET_ACCEPT_MARK
from felix_agent.calc.policy import PolicyChains, policy_chains
from felix_agent.calc.tier_policy import tier_policy_chains
from felix_agent.model import ClusterPolicy, NetworkPolicy

PREFIX_MAX = 64  # the kernel's NFLOG prefix length, NUL included
DROP = "-j DROP"


@dataclass(frozen=True)
class FlowLogConfig:
    group: int = 20  # the NFLOG group the agent listens on
    deny_rate: int = 100  # logged denied packets per second, per log rule
    deny_per_flow: int = 10  # ... and per (source, destination, port)
    allow_rate: int = 20  # sampled allowed packets per second, per log rule
    allow_per_flow: int = 1  # ... and per (source, destination, port)

    def __post_init__(self) -> None:
        if not 0 <= self.group <= 65535:
            raise ValueError(f"flow log NFLOG group {self.group} is not in 0-65535")
        for name in ("deny_rate", "deny_per_flow", "allow_rate", "allow_per_flow"):
            if not 1 <= getattr(self, name) <= 10000:
                raise ValueError(f"flow log {name} {getattr(self, name)} is not in 1-10000")


def rule_key(rule: FlowRule) -> str:
    """The short id a prefix carries: stable across passes, restarts and nodes."""
    text = "\0".join((rule.verdict, rule.direction, rule.tier, rule.policy, str(rule.rule)))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prefix(rule: FlowRule) -> str:
    return f"{'D' if rule.verdict == 'deny' else 'A'}:{rule_key(rule)}"


def hashlimit_name(deny: bool, per_flow: int, family: int) -> str:
    """The per-flow table's name (at most 15 characters: "cali-fl6-d10000")."""
    return f"cali-fl{'6' if family == 6 else ''}-{'d' if deny else 'a'}{per_flow}"


def log_line(match: str, rule: FlowRule, cfg: FlowLogConfig, family: int = 4) -> str:
    """The NFLOG rule for `rule`, with `match` (the verdict rule's own matches) first."""
    deny = rule.verdict == "deny"
    per_flow, rate = (cfg.deny_per_flow, cfg.deny_rate) if deny else (cfg.allow_per_flow, cfg.allow_rate)
    # The kernel shares one hashlimit table per name and keeps the settings it was made
    # with: the name carries the rate, so a new rate gets a new table.
    limits = (f"-m hashlimit --hashlimit-upto {per_flow}/sec --hashlimit-burst {per_flow} "
              f"--hashlimit-mode srcip,dstip,dstport --hashlimit-name {hashlimit_name(deny, per_flow, family)} "
              f"-m limit --limit {rate}/sec --limit-burst {rate}")
    return (f"{match + ' ' if match else ''}{limits} -j NFLOG --nflog-group {cfg.group} "
            f"--nflog-prefix {prefix(rule)} --nflog-size 96")


def _verdict_match(line: str) -> tuple[str, str] | None:
    """("deny" | "allow", the line's matches) when `line` makes a verdict, else None."""
    if line == DROP or line.endswith(" " + DROP):
        return "deny", line[:-len(DROP)].rstrip()
    if line == SET_ACCEPT_MARK or line.endswith(" " + SET_ACCEPT_MARK):
        return "allow", line[:-len(SET_ACCEPT_MARK)].rstrip()
    return None


@dataclass(frozen=True)
class Logged:
    """Chains with their log rules, and what the rules' ids mean."""

    chains: PolicyChains
    rules: tuple[tuple[str, FlowRule], ...]


def policy_name(policy: NetworkPolicy | ClusterPolicy) -> str:
    """As `tortiectl trace` names it (calc/trace.py's Step.policy)."""
    if isinstance(policy, NetworkPolicy):
        return f"NetworkPolicy {policy.key}"
    return f"{policy.kind}/{policy.name}"


@lru_cache(maxsize=8192)
def logged_policy(policy: NetworkPolicy | ClusterPolicy, cfg: FlowLogConfig, family: int = 4) -> Logged:
    """A policy's chains for IP `family` (calc/policy.py, calc/tier_policy.py) with a log
    rule before each of its verdicts; `rule_of` keeps pointing every line at its policy
    rule.  Pure and cached by value, as the chains themselves."""
    if isinstance(policy, NetworkPolicy):
        chains, tier = policy_chains(policy, family), "NetworkPolicy"
    else:
        chains, tier = tier_policy_chains(policy, family), policy.tier
    rule_names = {} if isinstance(policy, NetworkPolicy) else \
        {d: tuple(r.name for r in getattr(policy, d)) for d in ("ingress", "egress")}
    name = policy_name(policy)
    out: dict[str, tuple[str, ...]] = {}
    rule_of: dict[str, tuple[int, ...]] = {}
    rules: dict[str, FlowRule] = {}
    for chain, body in chains.chains.items():
        direction = "ingress" if chain.startswith(("cali-pi-", "cali-ci-")) else "egress"
        index = chains.rule_of.get(chain, ())
        lines: list[str] = []
        idx: list[int] = []
        for n, line in enumerate(body):
            hit = _verdict_match(line)
            i = index[n] if n < len(index) else -1
            if hit is not None:
                names = rule_names.get(direction, ())
                rule = FlowRule(hit[0], direction, tier, name, i, names[i] if 0 <= i < len(names) else "")
                rules[rule_key(rule)] = rule
                lines.append(log_line(hit[1], rule, cfg, family))
                idx.append(i)
            lines.append(line)
            idx.append(i)
        out[chain] = tuple(lines)
        rule_of[chain] = tuple(idx)
    return Logged(PolicyChains(MappingProxyType(out), chains.sets, chains.errors, MappingProxyType(rule_of)),
                  tuple(rules.items()))


def logged_endpoint_chain(body: tuple[str, ...], direction: str, network: Iterable[str],
                          cfg: FlowLogConfig, family: int = 4
                          ) -> tuple[tuple[str, ...], tuple[tuple[str, FlowRule], ...]]:
    """An endpoint chain (calc/endpoints.py) with a log rule before its final DROP (no
    NetworkPolicy of `network`, their names, allowed the packet) or, when it falls through
    to the default allow, at its end.  An empty chain (no policy selects the pod) stays
    empty: Kubernetes' default allow, nothing decided."""
    if not body:
        return body, ()
    names = ", ".join(network)
    if body[-1] == DROP:
        rule = FlowRule("deny", direction, "NetworkPolicy", names or "NetworkPolicy", -1)
        return (*body[:-1], log_line("", rule, cfg, family), DROP), ((rule_key(rule), rule),)
    rule = FlowRule("allow", direction, "default", "no tier rule decided: default allow", -1)
    return (*body, log_line("", rule, cfg, family)), ((rule_key(rule), rule),)
