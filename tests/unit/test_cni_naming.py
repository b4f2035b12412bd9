"""Host veth names: Calico's cali + sha1 scheme, within the kernel's 15 characters."""
import hashlib

from podnet.naming import host_iface_for, host_iface_name, host_iface_name_for_container


def test_calico_scheme():
    expect = "cali" + hashlib.sha1(b"default.web-0").hexdigest()[:11]
    assert host_iface_name("default", "web-0") == expect
    assert len(expect) == 15


def test_known_value():
    # sha1("kube-system.coredns-abc") computed independently with `sha1sum`.
    assert host_iface_name("kube-system", "coredns-abc") == "cali3d5d6ab04b5"


def test_second_interface_of_a_pod_differs():
    assert host_iface_name("ns", "p", "net1") != host_iface_name("ns", "p")
    assert len(host_iface_name("ns", "p", "net1")) == 15


def test_without_k8s_args_the_container_id_names_it():
    assert host_iface_for(None, None, "c0ffee") == host_iface_name_for_container("c0ffee")
    assert host_iface_for("ns", None, "c0ffee") == host_iface_name_for_container("c0ffee")
    assert host_iface_for("ns", "p", "c0ffee") == host_iface_name("ns", "p")


def test_same_digest_as_hashlib_for_any_key():
    """naming hashes with _sha1 (no OpenSSL load at start-up); the names must stay what
    hashlib's sha1 gave, or a restarted pod would not find its old veth."""
    import hashlib
    for ns, pod, ifname in [("default", "web-0", "eth0"), ("ns", "p", "net1"), ("ünï", "cødé-ø", "eth0"),
                            ("", "", "eth0"), ("a" * 253, "b" * 253, "eth0")]:
        key = f"{ns}.{pod}" if ifname == "eth0" else f"{ns}.{pod}.{ifname}"
        assert host_iface_name(ns, pod, ifname) == "cali" + hashlib.sha1(key.encode()).hexdigest()[:11]
