"""tortie on a real dual-stack Kubernetes (v1.20.2 with the IPv6DualStack feature gate, alpha
in that release): the controller-manager allocates a podCIDR of each family to every node,
kubelet reports an InternalIP of each family, and tortie installed from the manifests (its
default pool naming both families) gives every pod one address of each in one CNI ADD.

Pods are created with kubectl and wired by the real kubelet -> containerd -> CNI path; the
checks are real connections between pods on different nodes, over both families."""
from __future__ import annotations

import ipaddress
import json
import os

import pytest

from tests.kube.cluster import KubeLab, run, wait_for
from tests.kube.test_kube_e2e import connects, pod, root_state, server_from_client, up_and_clean

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the kube lab needs root (network namespaces)"),
              pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ds_lab():
    # root_state() holds the IPv6 forwarding sysctls too
    yield from up_and_clean(KubeLab(dual_stack=True), root_state())


def families(addrs) -> dict[int, str]:
    return {ipaddress.ip_address(a.split("/")[0]).version: a for a in addrs}


def url(ip: str) -> str:
    return f"http://[{ip}]:8080" if ":" in ip else f"http://{ip}:8080"


def client_ip(lab: KubeLab, src: str, ip: str) -> str:
    """What the server pod saw as the client's address (agnhost netexec's /clientip)."""
    out = lab.kubectl("exec", src, "--", "curl", "-s", "-g", "--max-time", "3", f"{url(ip)}/clientip",
                      check=False, timeout=30).stdout.strip()
    return out.rsplit(":", 1)[0].strip("[]")


def test_nodes_have_a_pod_cidr_and_an_internal_ip_of_each_family(ds_lab):
    for n in ds_lab.kjson("get", "nodes")["items"]:
        cidrs = families(n["spec"]["podCIDRs"])
        assert set(cidrs) == {4, 6}, n["spec"]
        assert cidrs[6].startswith("fd00:244:") and cidrs[6].endswith("/64"), cidrs
        ips = families(a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP")
        assert set(ips) == {4, 6}, n["status"]["addresses"]


def test_pods_get_both_families_and_reach_each_other_across_nodes_without_nat(ds_lab):
    lab = ds_lab
    a = pod(lab, "a", lab.nodes[0].name)
    b = pod(lab, "b", lab.nodes[1].name)
    ips = {}
    for p in (a, b):
        got = families(i["ip"] for i in p["status"]["podIPs"])
        assert set(got) == {4, 6}, p["status"]
        node = lab.kjson("get", "node", p["spec"]["nodeName"])
        for v, cidr in families(node["spec"]["podCIDRs"]).items():
            assert ipaddress.ip_address(got[v]) in ipaddress.ip_network(cidr), (got, cidr)
        ips[p["metadata"]["name"]] = got
    n1 = lab.nodes[0]
    # the manifests' default mode (bgp): BIRD's IPv6 session learns the peer's IPv6 podCIDR
    b6cidr = families(lab.kjson("get", "node", lab.nodes[1].name)["spec"]["podCIDRs"])[6]
    wait_for(lambda: f"via {lab.nodes[1].ip6} dev eth0 proto bird" in
             run(["ip", "-6", "-o", "route", "show", b6cidr], ns=n1.ns).stdout, 40,
             f"{n1.name}: {b6cidr} via {lab.nodes[1].ip6} from BIRD")
    for v in (4, 6):
        assert wait_for(lambda v=v: connects(lab, "a", f"[{ips['b'][v]}]" if v == 6 else ips["b"][v]), 30,
                        f"a -> b over IPv{v}")
        # the receiver sees the sender's own pod address: no NAT between pods
        assert client_ip(lab, "a", ips["b"][v]) == ips["a"][v]
        assert client_ip(lab, "b", ips["a"][v]) == ips["b"][v]
    for p in ("a", "b"):
        lab.kubectl("delete", "pod", p, "--wait=true", "--timeout=60s")
    for name, node in (("a", lab.nodes[0]), ("b", lab.nodes[1])):
        ip6 = ips[name][6]
        assert wait_for(lambda: ip6 not in run(["ip", "-6", "-o", "route", "show", "table", "all"], ns=node.ns).stdout,
                        20, f"no IPv6 route of the deleted pod {ip6} on {node.name}")


def test_network_policy_applies_to_both_families_across_nodes(ds_lab):
    lab = ds_lab
    lab.kubectl("create", "namespace", "np6")
    server = pod(lab, "server", lab.nodes[0].name, {"app": "server"}, ns="np6")
    pod(lab, "allowed", lab.nodes[1].name, {"app": "client"}, ns="np6")
    pod(lab, "other", lab.nodes[1].name, {"app": "other"}, ns="np6")
    ips = families(i["ip"] for i in server["status"]["podIPs"])
    target = {4: ips[4], 6: f"[{ips[6]}]"}
    for v in (4, 6):
        assert wait_for(lambda v=v: connects(lab, "other", target[v], ns="np6"), 30, f"other -> server over IPv{v}")
    lab.kubectl("apply", "-f", "-", input=json.dumps(server_from_client("np6")))
    for v in (4, 6):
        assert wait_for(lambda v=v: not connects(lab, "other", target[v], ns="np6"), 20,
                        f"the policy blocks app=other over IPv{v}")
        assert connects(lab, "allowed", target[v], ns="np6"), f"app=client must still reach the server over IPv{v}"
    lab.kubectl("delete", "namespace", "np6", "--wait=true", "--timeout=90s", timeout=120)
