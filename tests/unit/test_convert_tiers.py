"""ClusterNetworkPolicy (v1alpha2) and AdminNetworkPolicy/BaselineAdminNetworkPolicy
(v1alpha1) conversion: validation as their CRD schemas do it, each error naming the
object and the field, and the ANP/BANP spelling mapped onto the same tiers."""
import copy

import pytest

from felix_agent.datastore.convert import ConvertError, from_k8s
from felix_agent.model import BANP_PRIORITY, NamespacedPods, TierPort

CNP = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
       "metadata": {"name": "c"},
       "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {"matchLabels": {"t": "x"}}},
                "ingress": [{"action": "Deny", "from": [{"namespaces": {}}],
                             "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}],
                "egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.0/8"]}]}]}}


def with_spec(base: dict, path: str, value) -> dict:
    obj = copy.deepcopy(base)
    *parents, last = path.split(".")
    d = obj["spec"]
    for p in parents:
        d = d[int(p)] if isinstance(d, list) else d[p]
    if value is ...:
        del d[last]
    elif isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value
    return obj


@pytest.mark.parametrize("path,value,msg", [
    ("priority", 1001, "spec.priority: 1001 is out of range 0-1000"),
    ("priority", ..., "spec.priority: is required"),
    ("tier", "Middle", "spec.tier: 'Middle' is not one of Admin, Baseline"),
    ("subject", {}, "spec.subject: exactly one of namespaces, pods must be set"),
    ("subject", {"namespaces": {}, "pods": {"podSelector": {}}}, "got namespaces, pods"),
    ("subject", {"pods": {"namespaceSelector": {}}}, "spec.subject.pods.podSelector: is required"),
    ("ingress.0.action", "Allow", "spec.ingress[0].action: 'Allow' is not one of Accept, Deny, Pass"),
    ("ingress.0.from", [], "spec.ingress[0].from: must have 1 to 25 items, got 0"),
    ("ingress.0.from", [{"networks": ["10.0.0.0/8"]}], "unknown field 'networks'"),
    ("ingress.0.name", "n" * 101, "spec.ingress[0].name: is longer than 100 characters"),
    ("ingress.0.protocols", [{"tcp": {}}], "spec.ingress[0].protocols[0].tcp.destinationPort: is required"),
    ("ingress.0.protocols", [{"tcp": {"destinationPort": {"number": 0}}}], "0 is out of range 1-65535"),
    ("ingress.0.protocols", [{"udp": {"destinationPort": {"range": {"start": 9, "end": 9}}}}],
     "start 9 must be less than end 9"),
    ("ingress.0.protocols", [{"tcp": {"destinationPort": {"number": 1}}, "destinationNamedPort": "x"}],
     "exactly one of tcp, udp, sctp, destinationNamedPort"),
    ("ingress", [{"action": "Deny", "from": [{"namespaces": {}}]}] * 26, "spec.ingress: must have 0 to 25 items"),
    ("egress.0.to", [{"networks": ["10.0.0.300/8"]}], "spec.egress[0].to[0].networks[0]: '10.0.0.300/8' is not a valid CIDR"),
    ("egress.0.to", [{"networks": ["10.0.0.0/8", "10.0.0.0/8"]}], "duplicate entry"),
    ("egress.0.to", [{"nodes": {}, "networks": ["10.0.0.0/8"]}], "exactly one of namespaces, pods, nodes, networks, domainNames"),
    ("egress.0.to", [{"domainNames": ["example.com"]}], "domainNames peers"),
    ("egress.0", {"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}],
                  "protocols": [{"destinationNamedPort": "http"}]}, "cannot be combined with a named port"),
    ("egress.0", {"action": "Deny", "to": [{"nodes": {}}], "protocols": [{"destinationNamedPort": "http"}]},
     "a networks or nodes peer cannot be combined"),
])
def test_bad_cluster_network_policy_names_object_and_field(path, value, msg):
    with pytest.raises(ConvertError) as e:
        from_k8s(with_spec(CNP, path, value))
    assert str(e.value).startswith("ClusterNetworkPolicy c: ")
    assert msg in str(e.value)


def test_cluster_network_policy_fields():
    r = from_k8s(CNP)
    assert (r.tier, r.priority, r.ingress[0].action, r.ingress[0].ports) == ("Admin", 10, "Deny", (TierPort("TCP", 80),))
    assert r.egress[0].peers[0].networks == ("10.0.0.0/8",)


ANP = {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy", "metadata": {"name": "a"},
       "spec": {"priority": 3, "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"p": "a"}}}},
                "ingress": [{"action": "Allow", "from": [{"namespaces": {}}],
                             "ports": [{"portNumber": {"port": 80}},
                                       {"portRange": {"protocol": "UDP", "start": 5, "end": 6}},
                                       {"namedPort": "http"}]}]}}


def test_admin_network_policy_maps_onto_the_admin_tier():
    r = from_k8s(ANP)
    assert (r.kind, r.tier, r.priority, r.ingress[0].action) == ("AdminNetworkPolicy", "Admin", 3, "Accept")
    assert r.subject.pods == NamespacedPods(pods=r.subject.pods.pods)
    assert r.ingress[0].ports == (TierPort("TCP", 80), TierPort("UDP", 5, 6), TierPort(None, name="http"))
    with pytest.raises(ConvertError, match=r"spec.ingress\[0\].action: 'Accept' is not one of Allow, Deny, Pass"):
        from_k8s(with_spec(ANP, "ingress.0.action", "Accept"))
    with pytest.raises(ConvertError, match="unknown field 'tier'"):
        from_k8s(with_spec(ANP, "tier", "Admin"))


def test_baseline_admin_network_policy_is_one_default_object_without_pass():
    banp = {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "BaselineAdminNetworkPolicy",
            "metadata": {"name": "default"},
            "spec": {"subject": {"namespaces": {}}, "egress": [{"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]}}
    r = from_k8s(banp)
    assert (r.tier, r.priority, r.egress[0].action) == ("Baseline", BANP_PRIORITY, "Deny")
    with pytest.raises(ConvertError, match="metadata.name: must be 'default'"):
        from_k8s({**banp, "metadata": {"name": "other"}})
    with pytest.raises(ConvertError, match="'Pass' is not one of Allow, Deny"):
        from_k8s(with_spec(banp, "egress.0.action", "Pass"))
    with pytest.raises(ConvertError, match="unknown field 'priority'"):
        from_k8s(with_spec(banp, "priority", 1))


def test_wrong_api_version():
    with pytest.raises(ConvertError, match="'policy.networking.k8s.io/v1alpha1' is not 'policy.networking.k8s.io/v1alpha2'"):
        from_k8s({**CNP, "apiVersion": "policy.networking.k8s.io/v1alpha1"})
