"""The reference evaluator of Kubernetes NetworkPolicy semantics the truth-table suite
compares the real data path against, and its own checks (no root needed).

It is written from the networking.k8s.io/v1 API documentation, straight from the policy
dicts that are applied, and shares no code with tortie (not convert.py, not the calc), so
a misreading in tortie cannot hide in both places.  Rules it implements:

- A pod is isolated for a direction when at least one policy in its namespace selects it
  (podSelector) and lists that direction in policyTypes.  Omitted policyTypes means
  Ingress, plus Egress when the spec has a non-empty egress list.
- An isolated pod accepts (or sends) a connection only when some rule of some selecting
  policy allows it: the union.  A connection needs the sender's egress AND the receiver's
  ingress.
- A rule with no from/to matches every peer; with no ports every port.  A peer is an
  ipBlock (cidr minus except), or podSelector (in the policy's namespace) and/or
  namespaceSelector (both given: AND); an empty selector matches everything; namespaces
  carry kubernetes.io/metadata.name=<name>.
- Ports: protocol defaults to TCP; no port means every port of the protocol; endPort makes
  a range; a named port resolves on the DESTINATION pod (its containerPort of that name
  and protocol), so one name can mean a different number on every pod.
- Self (a pod to its own IP) is always allowed: the packet loops back inside the pod and
  never reaches the node.  Upstream's e2e expects the same.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

NS_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class RefPod:
    namespace: str
    name: str
    ip: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[tuple[str, int, str], ...] = ()  # (name, number, protocol) of containerPorts

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def selector_matches(sel: Mapping | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector dict; {} (and None here) match everything."""
    sel = sel or {}
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"operator {op!r}")
    return True


def policy_types(spec: Mapping) -> set[str]:
    if spec.get("policyTypes"):
        return set(spec["policyTypes"])
    return {"Ingress"} | ({"Egress"} if spec.get("egress") else set())


def _peer_matches(policy_ns: str, peer: Mapping, other: RefPod, ns_labels: Mapping[str, Mapping]) -> bool:
    if "ipBlock" in peer:
        ip = ipaddress.ip_address(other.ip)
        blk = peer["ipBlock"]
        return (ip in ipaddress.ip_network(blk["cidr"], strict=False)
                and not any(ip in ipaddress.ip_network(x, strict=False) for x in blk.get("except") or []))
    if "namespaceSelector" in peer:
        labels = {**ns_labels.get(other.namespace, {}), NS_NAME_LABEL: other.namespace}
        if not selector_matches(peer["namespaceSelector"], labels):
            return False
    elif other.namespace != policy_ns:
        return False
    return "podSelector" not in peer or selector_matches(peer["podSelector"], other.labels)


def _port_matches(ports: Sequence[Mapping], proto: str, port: int, dst: RefPod) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != proto:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            if any(n == want and pr == proto and num == port for n, num, pr in dst.ports):
                return True
            continue
        if want <= port <= p.get("endPort", want):
            return True
    return False


def _direction_allows(policies: Iterable[Mapping], subject: RefPod, peer: RefPod, dst: RefPod,
                      ptype: str, proto: str, port: int, ns_labels: Mapping[str, Mapping]) -> bool:
    rules_key, peers_key = ("ingress", "from") if ptype == "Ingress" else ("egress", "to")
    isolated = False
    for pol in policies:
        ns, spec = pol["metadata"]["namespace"], pol.get("spec") or {}
        if ns != subject.namespace or ptype not in policy_types(spec):
            continue
        if not selector_matches(spec.get("podSelector"), subject.labels):
            continue
        isolated = True
        for rule in spec.get(rules_key) or []:
            peers = rule.get(peers_key) or []
            if peers and not any(_peer_matches(ns, p, peer, ns_labels) for p in peers):
                continue
            if _port_matches(rule.get("ports") or [], proto, port, dst):
                return True
    return not isolated


def allowed(policies: Sequence[Mapping], src: RefPod, dst: RefPod, proto: str, port: int,
            ns_labels: Mapping[str, Mapping]) -> bool:
    """Whether a connection src -> dst:port/proto is allowed (proto upper case)."""
    if src.key == dst.key:
        return True
    return (_direction_allows(policies, src, dst, dst, "Egress", proto, port, ns_labels)
            and _direction_allows(policies, dst, src, dst, "Ingress", proto, port, ns_labels))


def expected_matrix(policies: Sequence[Mapping], pods: Sequence[RefPod], ports: Iterable[tuple[str, int]],
                    ns_labels: Mapping[str, Mapping]) -> dict[tuple[str, int], dict[tuple[str, str], bool]]:
    return {(proto, port): {(s.key, d.key): allowed(policies, s, d, proto.upper(), port, ns_labels)
                            for s in pods for d in pods}
            for proto, port in ports}


# --- the evaluator's own checks: hand-written tables -------------------------------------

def _pods() -> list[RefPod]:
    named = (("serve-80-tcp", 80, "TCP"), ("serve-80-udp", 80, "UDP"))
    return [RefPod("x", "a", "10.0.0.1", {"pod": "a"}, named + (("web", 80, "TCP"),)),
            RefPod("x", "b", "10.0.0.2", {"pod": "b"}, named + (("web", 80, "TCP"),)),
            RefPod("y", "a", "10.0.1.1", {"pod": "a"}, named + (("web", 81, "TCP"),))]


NS = {"x": {"ns": "x"}, "y": {"ns": "y"}}


def _pol(ns: str, spec: dict) -> dict:
    return {"metadata": {"namespace": ns, "name": "p"}, "spec": spec}


def _table(policies, proto="TCP", port=80) -> str:
    """Rows of 'ab.' strings: '.' allowed 'X' denied, sources x/a, x/b, y/a."""
    pods = _pods()
    return " ".join("".join("." if allowed(policies, s, d, proto, port, NS) else "X" for d in pods)
                    for s in pods)


def test_no_policy_allows_everything():
    assert _table([]) == "... ... ..."


def test_default_deny_ingress_keeps_self_and_egress():
    pol = _pol("x", {"podSelector": {}, "policyTypes": ["Ingress"]})
    assert _table([pol]) == ".X. X.. XX."


def test_policy_types_default_adds_egress_only_with_egress_rules():
    assert _table([_pol("x", {"podSelector": {}})]) == ".X. X.. XX."
    egress = _pol("x", {"podSelector": {}, "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": 81}]}]})
    assert _table([egress]) == ".XX X.X XX."


def test_and_versus_or_of_selectors():
    both = _pol("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    either = _pol("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    assert _table([both]) == "... X.. X.."
    assert _table([either]) == "... ... ..."


def test_named_port_resolves_on_the_destination():
    pol = _pol("y", {"podSelector": {}, "ingress": [{"ports": [{"port": "web"}]}]})
    assert _table([pol], port=80) == "..X ..X ..."
    assert _table([pol], port=81) == "... ... ..."


def test_ip_block_except_and_end_port():
    pol = _pol("x", {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16",
                                                                            "except": ["10.0.1.0/24"]}}],
                                                      "ports": [{"port": 79, "endPort": 80}]}]})
    assert _table([pol], port=80) == "... ... XX."
    assert _table([pol], port=81) == ".X. X.. XX."


def test_expressions():
    labels = {"pod": "a", "tier": "web"}
    assert selector_matches({"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]}, labels)
    assert selector_matches({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["a"]}]}, labels)
    assert selector_matches({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "x", "operator": "In", "values": ["a"]}]}, labels)
