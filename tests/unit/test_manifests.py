"""The install manifests, parsed into the kubernetes client's own models, and the rules a
DaemonSet-delivered CNI must follow."""
import json
import os

import pytest
import yaml
from kubernetes import client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
}


def load(name):
    with open(os.path.join(ROOT, "manifests", name)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    api = client.ApiClient()
    out = {}
    for d in docs:
        model = MODELS[(d["apiVersion"], d["kind"])]
        # The client's own deserializer: unknown or mistyped fields fail here.
        obj = api._ApiClient__deserialize(d, model)
        assert api.sanitize_for_serialization(obj)["metadata"]["name"] == d["metadata"]["name"]
        out[(d["kind"], d["metadata"]["name"])] = obj
    return out


@pytest.fixture(scope="module")
def objs():
    return load("tortie.yaml")


def ds(objs):
    return objs[("DaemonSet", "tortie-node")]


def test_every_kind_present(objs):
    kinds = {k for k, _ in objs}
    assert kinds == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"}


def test_rbac_is_read_only_and_minimal(objs):
    role = objs[("ClusterRole", "tortie-agent")]
    granted = {}
    for r in role.rules:
        for g in r.api_groups:
            for res in r.resources:
                granted[(g, res)] = set(r.verbs)
    assert granted == {
        ("", "pods"): {"get", "list", "watch"},
        ("", "namespaces"): {"get", "list", "watch"},
        ("", "nodes"): {"get", "list", "watch"},
        ("networking.k8s.io", "networkpolicies"): {"get", "list", "watch"},
        **{("policy.networking.k8s.io", plural): {"get", "list", "watch"}
           for plural in ("clusternetworkpolicies", "adminnetworkpolicies", "baselineadminnetworkpolicies")},
    }
    binding = objs[("ClusterRoleBinding", "tortie-agent")]
    assert binding.role_ref.name == "tortie-agent"
    assert binding.subjects[0].name == ds(objs).spec.template.spec.service_account_name


def test_daemonset_shape(objs):
    spec = ds(objs).spec
    pod = spec.template.spec
    assert pod.host_network is True
    assert spec.update_strategy.type == "RollingUpdate"
    assert any(t.operator == "Exists" and not t.key and not t.effect for t in pod.tolerations)
    agent = pod.containers[0]
    assert agent.security_context.privileged
    assert agent.liveness_probe.http_get.path == "/livez"
    assert agent.readiness_probe.http_get.path == "/readyz"
    assert agent.resources.requests["cpu"] and agent.resources.requests["memory"]
    env = {e.name: e for e in agent.env}
    assert env["TORTIE_NODE_NAME"].value_from.field_ref.field_path == "spec.nodeName"


def test_host_mounts(objs):
    pod = ds(objs).spec.template.spec
    vols = {v.name: v.host_path.path for v in pod.volumes if v.host_path}
    mounts = {m.mount_path: m for m in pod.containers[0].volume_mounts}
    for path in ("/lib/modules", "/var/run/netns", "/run/xtables.lock", "/var/lib/tortie",
                 "/var/run/tortie", "/opt/cni/bin", "/etc/cni/net.d"):
        assert path in mounts, path
        assert vols[mounts[path].name] == path
    assert mounts["/var/run/netns"].mount_propagation == "HostToContainer"
    assert mounts["/lib/modules"].read_only


def test_init_container_installs_cni(objs):
    pod = ds(objs).spec.template.spec
    init = pod.init_containers[0]
    assert init.command == ["/opt/tortie/install-cni.sh"]
    mounts = {m.mount_path for m in init.volume_mounts}
    assert {"/host/opt/cni/bin", "/host/etc/cni/net.d"} <= mounts


def test_configmap_holds_valid_agent_config_and_conflist(objs, tmp_path):
    from felix_agent import config

    cm = objs[("ConfigMap", "tortie-config")]
    f = tmp_path / "agent.yaml"
    f.write_text(cm.data["agent.yaml"])
    c = config.load(["--config", str(f)], environ={})
    assert c.datastore == "kubernetes"
    conflist = json.loads(cm.data["10-tortie.conflist"])
    assert conflist["plugins"][0]["type"] == "tortie"
    assert conflist["plugins"][0]["ipam"]["type"] == "tortie"


def test_uninstall_manifest_parses():
    objs = load("uninstall.yaml")
    pod = objs[("DaemonSet", "tortie-uninstall")].spec.template.spec
    assert pod.init_containers[0].command == ["/opt/tortie/uninstall-node.sh"]


def test_install_script_inputs_match_the_manifest(objs):
    """The init container's CNI_CONFLIST_FILE is the ConfigMap key, mounted where it says."""
    pod = ds(objs).spec.template.spec
    init = pod.init_containers[0]
    env = {e.name: e.value for e in init.env}
    path = env["CNI_CONFLIST_FILE"]
    mount = next(m for m in init.volume_mounts if path.startswith(m.mount_path + "/"))
    vol = next(v for v in pod.volumes if v.name == mount.name)
    assert vol.config_map.name == "tortie-config"
    assert os.path.basename(path) in objs[("ConfigMap", "tortie-config")].data
    assert env["HOST_ROOT"] == "/host"


def test_uninstall_mounts_every_host_path_the_script_cleans():
    pod = load("uninstall.yaml")[("DaemonSet", "tortie-uninstall")].spec.template.spec
    assert pod.host_network is True  # chains, ipsets and routes of the node itself
    mounts = {m.mount_path for m in pod.init_containers[0].volume_mounts}
    with open(os.path.join(ROOT, "deploy", "uninstall-node.sh")) as f:
        script = f.read()
    for host_path in ("/opt/cni/bin", "/etc/cni/net.d", "/var/lib/tortie", "/var/run/tortie"):
        assert f"$HOST_ROOT{host_path}" in script
        assert f"/host{host_path}" in mounts, host_path


def test_network_policy_api_crds_match_what_tortie_converts():
    """The CRDs parse as the client's model, name the kinds, versions and plurals the
    syncer watches, and their schemas keep the upstream limits the converter checks."""
    from felix_agent.datastore.convert import API_VERSION
    from felix_agent.datastore.keys import PLURAL
    from felix_agent.model import CLUSTER_POLICY_KINDS

    with open(os.path.join(ROOT, "manifests", "network-policy-api.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    api = client.ApiClient()
    by_kind = {}
    for d in docs:
        crd = api._ApiClient__deserialize(d, "V1CustomResourceDefinition")
        by_kind[crd.spec.names.kind] = crd
    assert sorted(by_kind) == sorted(CLUSTER_POLICY_KINDS)
    for kind, crd in by_kind.items():
        assert crd.spec.scope == "Cluster" and crd.spec.names.plural == PLURAL[kind]
        assert f"{crd.spec.group}/{crd.spec.versions[0].name}" == API_VERSION[kind]
        assert "network-policy-api v0." in crd.metadata.annotations["tortie.io/upstream"]
        # *.k8s.io groups are protected: without this the API server refuses the CRD
        assert crd.metadata.annotations["api-approved.kubernetes.io"].startswith("https://github.com/")
    spec = by_kind["ClusterNetworkPolicy"].spec.versions[0].schema.open_apiv3_schema.properties["spec"]
    assert (spec.properties["priority"].minimum, spec.properties["priority"].maximum) == (0, 1000)
    assert spec.properties["tier"].enum == ["Admin", "Baseline"]
    assert spec.properties["ingress"].max_items == 25


def test_fanout_manifest_serves_agents_read_only_on_the_protocols_port(objs):
    """manifests/tortie-fanout.yaml: the fan-out runs as its own service account bound to
    the agent's read-only role, on the host network, listening on the port its Service
    forwards to; an agent configured the way the file's header says resolves to it."""
    from felix_agent import config
    from felix_agent.datastore.fanout.main import parser
    from felix_agent.datastore.fanout.protocol import DEFAULT_PORT

    fan = load("tortie-fanout.yaml")
    assert {k for k, _ in fan} == {"ServiceAccount", "ClusterRoleBinding", "Deployment", "Service"}
    binding = fan[("ClusterRoleBinding", "tortie-fanout")]
    assert binding.role_ref.name == "tortie-agent" and ("ClusterRole", "tortie-agent") in objs
    assert [(s.name, s.namespace) for s in binding.subjects] == [("tortie-fanout", "tortie-system")]
    pod = fan[("Deployment", "tortie-fanout")].spec.template.spec
    assert pod.host_network and pod.service_account_name == "tortie-fanout"
    (c,) = pod.containers
    args = parser().parse_args(c.command[1:])
    assert c.command[0] == "tortie-fanout" and args.listen == f"0.0.0.0:{DEFAULT_PORT}"
    svc = fan[("Service", "tortie-fanout")]
    assert svc.metadata.namespace == ds(objs).metadata.namespace  # so agents get its service links
    (port,) = svc.spec.ports
    assert port.port == DEFAULT_PORT and port.target_port == "fanout"
    assert {p.name: p.container_port for p in c.ports}["fanout"] == DEFAULT_PORT
    # The probes ask the fan-out itself (its metrics port): ready = its API watch is in sync.
    ports = {p.name: p.container_port for p in c.ports}
    assert ports["metrics"] == args.metrics_port
    assert (c.readiness_probe.http_get.path, c.readiness_probe.http_get.port) == ("/readyz", "metrics")
    assert (c.liveness_probe.http_get.path, c.liveness_probe.http_get.port) == ("/livez", "metrics")
    # What the kubelet gives the agents for this Service, and the header's set-env line.
    env = {"TORTIE_CONFIG": "", "TORTIE_DATASTORE": "kubernetes",
           "TORTIE_FANOUT_SERVICE_HOST": "10.96.0.40", "TORTIE_FANOUT_SERVICE_PORT": str(port.port),
           "TORTIE_FANOUT_PORT": f"tcp://10.96.0.40:{port.port}",
           f"TORTIE_FANOUT_PORT_{port.port}_TCP_ADDR": "10.96.0.40"}
    env["TORTIE_FANOUT_ENDPOINTS"] = f"{env['TORTIE_FANOUT_SERVICE_HOST']}:{env['TORTIE_FANOUT_SERVICE_PORT']}"
    assert config.load([], environ=env).fanout_addresses == [("10.96.0.40", DEFAULT_PORT)]
