"""The reference evaluator of Kubernetes NetworkPolicy semantics the truth-table suite
compares the real data path against, and its own checks (no root needed).

It is written from the networking.k8s.io/v1 API documentation, straight from the policy
dicts that are applied, and shares no code with tortie (not the converter, not the calc), so
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

Cluster policies (policy.networking.k8s.io: ClusterNetworkPolicy v1alpha2, written from
the network-policy-api v0.2.0 docs; AdminNetworkPolicy/BaselineAdminNetworkPolicy
v1alpha1 from v0.1.7), per direction:
- Admin tier first (CNPs with tier Admin and ANPs), by priority (lower first), each
  policy's rules in order; the first rule whose peers and ports match decides: Accept
  (ANP: Allow) allows and skips NetworkPolicy, Deny denies, Pass skips the rest of the
  tier.  Subject and peers: `namespaces` = every pod there, `pods` = podSelector within
  namespaceSelector, `networks` = CIDRs (matched on the IP, pods included).
- Then NetworkPolicy as above when some NetworkPolicy isolates the pod for the direction:
  its verdict is final.
- Otherwise the Baseline tier (CNPs with tier Baseline, then the BANP) the same way;
  Deny denies, Accept, Pass or no match allow.
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


CLUSTER_KINDS = ("ClusterNetworkPolicy", "AdminNetworkPolicy", "BaselineAdminNetworkPolicy")


def _ns_labels_of(pod: RefPod, ns_labels: Mapping[str, Mapping]) -> dict:
    return {**ns_labels.get(pod.namespace, {}), NS_NAME_LABEL: pod.namespace}


def tier_peer_matches(peer: Mapping, other: RefPod, ns_labels: Mapping[str, Mapping]) -> bool:
    if "networks" in peer:
        return any(ipaddress.ip_address(other.ip) in ipaddress.ip_network(n, strict=False) for n in peer["networks"])
    if "namespaces" in peer:
        return selector_matches(peer["namespaces"], _ns_labels_of(other, ns_labels))
    pods = peer["pods"]
    return (selector_matches(pods.get("namespaceSelector"), _ns_labels_of(other, ns_labels))
            and selector_matches(pods["podSelector"], other.labels))


def _tier_port_matches(p: Mapping, proto: str, port: int, dst: RefPod) -> bool:
    name = p.get("destinationNamedPort") or p.get("namedPort")
    if name:  # the destination's containerPort of that name, whatever its protocol
        return any(n == name and pr == proto and num == port for n, num, pr in dst.ports)
    if "portNumber" in p or "portRange" in p:  # ANP/BANP spelling
        q = p.get("portNumber") or p["portRange"]
        lo, hi = (q["port"], q["port"]) if "portNumber" in p else (q["start"], q["end"])
        return q.get("protocol", "TCP") == proto and lo <= port <= hi
    (pname, body), = p.items()  # CNP: {"tcp": {"destinationPort": {...}}}
    d = body["destinationPort"]
    lo, hi = (d["number"], d["number"]) if "number" in d else (d["range"]["start"], d["range"]["end"])
    return pname.upper() == proto and lo <= port <= hi


def _tier(pol: Mapping) -> str:
    return {"AdminNetworkPolicy": "Admin", "BaselineAdminNetworkPolicy": "Baseline"}.get(
        pol["kind"]) or pol["spec"]["tier"]


def _tier_decision(policies: Sequence[Mapping], tier: str, subject: RefPod, peer: RefPod, dst: RefPod,
                   ptype: str, proto: str, port: int, ns_labels: Mapping[str, Mapping]) -> str:
    """"Accept", "Deny", or "Pass" (also when nothing matched)."""
    rules_key, peers_key = ("ingress", "from") if ptype == "Ingress" else ("egress", "to")
    mine = [p for p in policies if p.get("kind") in CLUSTER_KINDS and _tier(p) == tier
            and tier_peer_matches(p["spec"]["subject"], subject, ns_labels)]
    mine.sort(key=lambda p: (p["spec"].get("priority", 1001), CLUSTER_KINDS.index(p["kind"]), p["metadata"]["name"]))
    for pol in mine:
        for rule in pol["spec"].get(rules_key) or []:
            ports = rule.get("protocols") or rule.get("ports") or []
            if any(tier_peer_matches(x, peer, ns_labels) for x in rule[peers_key]) and \
               (not ports or any(_tier_port_matches(x, proto, port, dst) for x in ports)):
                return "Accept" if rule["action"] in ("Accept", "Allow") else rule["action"]
    return "Pass"


def _tiered_allows(policies: Sequence[Mapping], subject: RefPod, peer: RefPod, dst: RefPod,
                   ptype: str, proto: str, port: int, ns_labels: Mapping[str, Mapping]) -> bool:
    args = (subject, peer, dst, ptype, proto, port, ns_labels)
    admin = _tier_decision(policies, "Admin", *args)
    if admin != "Pass":
        return admin == "Accept"
    nps = [p for p in policies if p.get("kind", "NetworkPolicy") == "NetworkPolicy"]
    isolated = any(p["metadata"]["namespace"] == subject.namespace and ptype in policy_types(p.get("spec") or {})
                   and selector_matches((p.get("spec") or {}).get("podSelector"), subject.labels) for p in nps)
    if isolated:
        return _direction_allows(nps, *args)
    return _tier_decision(policies, "Baseline", *args) != "Deny"


def allowed(policies: Sequence[Mapping], src: RefPod, dst: RefPod, proto: str, port: int,
            ns_labels: Mapping[str, Mapping]) -> bool:
    """Whether a connection src -> dst:port/proto is allowed (proto upper case)."""
    if src.key == dst.key:
        return True
    return (_tiered_allows(policies, src, dst, dst, "Egress", proto, port, ns_labels)
            and _tiered_allows(policies, dst, src, dst, "Ingress", proto, port, ns_labels))


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


def _cnp(name: str, tier: str, priority: int, subject: dict, ingress: list) -> dict:
    return {"kind": "ClusterNetworkPolicy", "metadata": {"name": name},
            "spec": {"tier": tier, "priority": priority, "subject": subject, "ingress": ingress}}


def test_tiers_admin_then_networkpolicy_then_baseline():
    x = {"namespaces": {"matchLabels": {"ns": "x"}}}
    from_y = [{"namespaces": {"matchLabels": {"ns": "y"}}}]
    deny_all_x = _pol("x", {"podSelector": {}, "policyTypes": ["Ingress"]})
    admin = lambda action, prio=1: _cnp(f"a{prio}", "Admin", prio, x, [{"action": action, "from": from_y}])
    assert _table([admin("Deny")]) == "... ... XX."
    assert _table([deny_all_x, admin("Accept")]) == ".X. X.. ..."
    assert _table([deny_all_x, admin("Pass")]) == ".X. X.. XX."
    assert _table([admin("Pass", 1), admin("Deny", 2)]) == "... ... ..."  # Pass skips the tier
    assert _table([admin("Accept", 2), admin("Deny", 1)]) == "... ... XX."  # priority
    base = _cnp("b", "Baseline", 1, x, [{"action": "Deny", "from": from_y}])
    assert _table([base]) == "... ... XX."
    assert _table([base, _pol("x", {"podSelector": {}, "ingress": [{}]})]) == "... ... ..."  # NetworkPolicy wins
    banp = {"kind": "BaselineAdminNetworkPolicy", "metadata": {"name": "default"},
            "spec": {"subject": x, "ingress": [{"action": "Deny", "from": from_y,
                                                "ports": [{"portNumber": {"protocol": "TCP", "port": 80}}]}]}}
    assert _table([banp]) == "... ... XX." and _table([banp], port=81) == "... ... ..."
