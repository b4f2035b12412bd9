"""tortie-fanout in front of a REAL kube-apiserver (v1.20.2 of the kube lab, control plane
only: etcd, kube-apiserver, controller-manager, scheduler; no nodes needed), its watches
counted by the API server itself: `apiserver_registered_watchers`, the gauge its watch
handler raises for every open watch request, per kind. Ten agents' datastore sides
(tests/lab/fanout_client.py processes) through one fan-out add ONE watch per kind; three
that watch the API themselves add three. Everything runs in the lab's control-plane
namespace. And the fan-out's manifest, applied to that API server for real."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

from felix_agent.datastore.fanout.protocol import DEFAULT_PORT
from tests.kube.cluster import ROOT, KubeLab, build_binaries, leftovers, wait_for
from tests.lab.fanout import ClientProcess, VENV_BIN

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the kube lab needs root (network namespaces)"),
              pytest.mark.timeout(600)]

KINDS = {"Pod": "", "Namespace": "", "Node": "", "NetworkPolicy": "networking.k8s.io"}


@pytest.fixture(scope="module")
def control_plane():
    k = KubeLab(n_nodes=0)
    k.bin_dir = build_binaries()
    try:
        k.build_network()
        k.make_pki()
        k.start_control_plane()
        yield k
    finally:
        k.down()
    assert leftovers(k.prefix) == []


def watchers(k: KubeLab) -> dict[str, int]:
    text = k.kubectl("get", "--raw", "/metrics").stdout
    out = dict.fromkeys(KINDS, 0)
    for kind, group in KINDS.items():
        m = re.search(r'^apiserver_registered_watchers\{group="%s",kind="%s",version="v1"\} (\d+)'
                      % (re.escape(group), kind), text, re.M)
        out[kind] = int(m.group(1)) if m else 0
    return out


def watchers_plus(k: KubeLab, base: dict[str, int], n: int) -> dict[str, int] | None:
    """The watchers now, if every kind has exactly n more than `base`."""
    w = watchers(k)
    return w if all(w[kind] == base[kind] + n for kind in KINDS) else None


def test_ten_agents_through_the_fanout_hold_one_watch_per_kind(control_plane):
    k = control_plane
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fan", "labels": {"team": "a"}}},
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n-fan"},
             "spec": {"podCIDR": "10.244.7.0/24", "podCIDRs": ["10.244.7.0/24"]}},
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "deny", "namespace": "fan"}, "spec": {"podSelector": {}}}]
    docs += [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}", "namespace": "fan",
                                                              "labels": {"app": "web"}},
              "spec": {"nodeName": "n-fan", "containers": [{"name": "c", "image": "none"}]}}
             for i in range(20)]
    k.kubectl("apply", "-f", "-", input="\n".join(json.dumps(d) for d in docs))
    before = watchers(k)
    k.popen("tortie-fanout", k.cp, [os.path.join(VENV_BIN, "tortie-fanout"), "--kubeconfig", k.kubeconfig,
                                    "--listen", "127.0.0.1:5473", "--metrics-port", "0"])
    agents = [ClientProcess(("127.0.0.1", 5473), f"node-{i}", k.enter(k.cp)) for i in range(10)]
    direct: list[ClientProcess] = []
    try:
        wait_for(lambda: all(a.in_sync for a in agents), 90, "ten agents in sync through the fan-out")
        models = [a.model() for a in agents]
        assert all(m == models[0] for m in models)
        assert {key for kind, key in models[0] if kind == "Pod" and key.startswith("fan/")} == \
            {f"fan/p{i}" for i in range(20)}
        assert ("BlockAffinity", "10.244.7.0/24") in models[0] and ("NetworkPolicy", "fan/deny") in models[0]
        with_fanout = wait_for(lambda: watchers_plus(k, before, 1), 30, "one more watch per kind")

        k.kubectl("label", "pod", "-n", "fan", "p3", "app=db", "--overwrite")
        wait_for(lambda: all(dict(a.model()[("Pod", "fan/p3")].labels)["app"] == "db" for a in agents), 30,
                 "the label change at every agent")
        assert watchers(k) == with_fanout

        direct = [ClientProcess(k.kubeconfig, f"direct-{i}", k.enter(k.cp)) for i in range(3)]
        wait_for(lambda: all(a.in_sync for a in direct), 90, "three agents watching the API themselves")
        wait_for(lambda: watchers_plus(k, with_fanout, 3), 30, "three more watches per kind")
        assert all(a.model() == agents[0].model() for a in direct)
        print(f"\nAPI watchers per kind: before {before}; +10 agents through the fan-out {with_fanout}; "
              f"+3 direct {watchers(k)}", file=sys.stderr)
    finally:
        for a in agents + direct:
            a.kill()


def test_the_fanout_manifest_applies_to_the_real_api_server(control_plane):
    """manifests/tortie-fanout.yaml after manifests/tortie.yaml, `kubectl apply` for real
    (the API server validates every field); the Service forwards the protocol's port."""
    k = control_plane
    for name in ("tortie.yaml", "tortie-fanout.yaml"):
        k.kubectl("apply", "-f", os.path.join(ROOT, "manifests", name))
    svc = k.kjson("get", "service", "-n", "tortie-system", "tortie-fanout")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(DEFAULT_PORT, "fanout")]
    dep = k.kjson("get", "deployment", "-n", "tortie-system", "tortie-fanout")
    assert dep["spec"]["template"]["spec"]["hostNetwork"] is True
    binding = k.kjson("get", "clusterrolebinding", "tortie-fanout")
    assert binding["roleRef"]["name"] == "tortie-agent"
