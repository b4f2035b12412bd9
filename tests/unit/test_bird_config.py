"""BIRD config rendering (felix_agent.calc.bird_conf), checked structurally and by BIRD's own
parser (`bird -p -c`, no root needed), plus the `show protocols` parser and the config
safety of BirdDaemon (a bad config never replaces a good one)."""
import os
import re
import shutil
import subprocess

import pytest

from felix_agent.dataplane.bird import BirdDaemon, BirdError, parse_protocols
from felix_agent.calc.bird_conf import bird_config, protocol_name, sessions
from felix_agent.model import BGPPeer, BlockAffinity, IPPool, Node

needs_bird = pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 is not installed")

N = [Node(f"node{i}", f"192.168.100.{10 + i}/24") for i in range(1, 5)]
POOLS = [IPPool("default", "10.65.0.0/16")]
BLOCKS = [BlockAffinity(f"10.65.{i}.0/26", f"node{i}") for i in range(1, 5)]


def bird_parses(text, tmp_path):
    path = tmp_path / "bird.conf"
    path.write_text(text)
    p = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr + "\n" + text
    return True


def protocol_block(text, name):
    m = re.search(r"protocol bgp %s from tortie_peer \{\n(.*?)\n\}" % name, text, re.S)
    assert m, f"no protocol {name}"
    return m.group(1)


def bgp_names(text):
    return re.findall(r"^protocol bgp (\S+)", text, re.M)


@needs_bird
def test_mesh(tmp_path):
    text = bird_config(N, [], POOLS, BLOCKS, "node1")
    assert "router id 192.168.100.11;" in text
    assert bgp_names(text) == ["Mesh_192_168_100_12", "Mesh_192_168_100_13", "Mesh_192_168_100_14"]
    assert "local 192.168.100.11 port 179 as 64512;" in text
    assert "neighbor 192.168.100.12 port 179 as 64512;" in protocol_block(text, "Mesh_192_168_100_12")
    # own block announced as a blackhole; others' blocks are not ours to announce
    assert "route 10.65.1.0/26 blackhole;" in text and "10.65.2.0/26 blackhole" not in text
    assert "rr client" not in text
    bird_parses(text, tmp_path)


@needs_bird
def test_route_reflector_topology(tmp_path):
    nodes = list(N)
    nodes[0] = Node("node1", "192.168.100.11/24", route_reflector_cluster_id="244.0.0.1")
    rr = bird_config(nodes, [], POOLS, BLOCKS, "node1")
    assert bgp_names(rr) == ["Node_192_168_100_12", "Node_192_168_100_13", "Node_192_168_100_14"]
    for name in bgp_names(rr):
        body = protocol_block(rr, name)
        assert "rr client;" in body and "rr cluster id 244.0.0.1;" in body
    assert "# reflection" in rr  # a reflector re-exports what it learnt
    bird_parses(rr, tmp_path)
    client = bird_config(nodes, [], POOLS, BLOCKS, "node3")
    assert bgp_names(client) == ["Node_192_168_100_11"]  # exactly one session: the reflector
    assert "rr client" not in client and "# reflection" not in client
    bird_parses(client, tmp_path)


@needs_bird
def test_two_reflectors_peer_plainly(tmp_path):
    nodes = [Node("r1", "192.168.100.11/24", route_reflector_cluster_id="1"),
             Node("r2", "192.168.100.12/24", route_reflector_cluster_id="1"),
             Node("c", "192.168.100.13/24")]
    text = bird_config(nodes, [], POOLS, [], "r1")
    assert "rr client" not in protocol_block(text, "Node_192_168_100_12")
    assert "rr cluster id 0.0.0.1;" in protocol_block(text, "Node_192_168_100_13")
    assert bgp_names(bird_config(nodes, [], POOLS, [], "c")) == ["Node_192_168_100_11", "Node_192_168_100_12"]
    bird_parses(text, tmp_path)


def test_bad_cluster_id_is_a_clear_error():
    nodes = [Node("r1", "192.168.100.11/24", route_reflector_cluster_id="rack-a"), N[1]]
    with pytest.raises(ValueError, match="route_reflector_cluster_id 'rack-a'"):
        bird_config(nodes, [], POOLS, [], "r1")


@needs_bird
def test_explicit_peers(tmp_path):
    peers = [BGPPeer("tor-a", "192.168.100.1", 65000),
             BGPPeer("only-n2", "192.168.100.2", 65000, node="node2"),
             BGPPeer("dup", "192.168.100.12", 64512),  # already a mesh session
             BGPPeer("far", "10.9.9.9", 65010)]
    text = bird_config(N[:2], peers, POOLS, BLOCKS, "node1")
    assert bgp_names(text) == ["Mesh_192_168_100_12", "Peer_far", "Peer_tor_a"]
    assert "neighbor 192.168.100.1 port 179 as 65000;" in protocol_block(text, "Peer_tor_a")
    assert "multihop" not in protocol_block(text, "Peer_tor_a")  # on my subnet: direct eBGP
    assert "multihop;" in protocol_block(text, "Peer_far")
    bird_parses(text, tmp_path)
    text2 = bird_config(N[:2], peers, POOLS, BLOCKS, "node2")
    assert "Peer_only_n2" in bgp_names(text2)


def test_bad_peer_is_a_clear_error():
    with pytest.raises(ValueError, match="BGPPeer x: 'nope' is not an IP address"):
        bird_config(N, [BGPPeer("x", "nope", 65000)], POOLS, BLOCKS, "node1")
    with pytest.raises(ValueError, match="unknown"):
        bird_config(N, [], POOLS, BLOCKS, "ghost")
    with pytest.raises(ValueError, match="listen_port"):
        bird_config(N, [], POOLS, BLOCKS, "node1", listen_port=0)


@needs_bird
def test_per_node_as_is_ebgp(tmp_path):
    nodes = [Node("a", "192.168.100.11/24", as_number=65001), Node("b", "192.168.100.12/24", as_number=65002),
             Node("c", "192.168.200.13/24", as_number=65003)]
    text = bird_config(nodes, [], POOLS, [], "a")
    assert "local 192.168.100.11 port 179 as 65001;" in text
    assert "as 65002;" in protocol_block(text, "Mesh_192_168_100_12")
    assert "multihop" not in protocol_block(text, "Mesh_192_168_100_12")
    assert "multihop;" in protocol_block(text, "Mesh_192_168_200_13")  # eBGP across a router
    bird_parses(text, tmp_path)


def test_sessions_default_as():
    s = sessions([Node("a", "192.168.100.11/24"), Node("b", "192.168.100.12/24", as_number=65009)], [], "a",
                 default_as=65100)
    assert [(x.name, x.peer_as) for x in s] == [("Mesh_192_168_100_12", 65009)]


@needs_bird
def test_pool_filters(tmp_path):
    pools = [IPPool("b", "10.65.0.0/16"), IPPool("v", "10.66.0.0/16", mode="vxlan"),
             IPPool("off", "10.67.0.0/16", disabled=True)]
    text = bird_config(N[:2], [], pools, BLOCKS, "node1")
    imp = re.search(r"filter tortie_bgp_import \{(.*?)\n\}", text, re.S).group(1)
    assert "10.65.0.0/16+" in imp and "10.66.0.0/16+" in imp and "10.67" not in imp
    assert "if net ~ [ 10.65.1.0/26 ] then reject;" in imp  # never learn my own block
    kern = re.search(r"filter tortie_kernel_export \{(.*?)\n\}", text, re.S).group(1)
    assert "if source != RTS_BGP then reject;" in kern  # statics (blackholes) stay out of the kernel
    assert "10.65.0.0/16+" in kern and "10.66" not in kern  # vxlan routes are the agent's
    exp = re.search(r"filter tortie_bgp_export \{(.*?)\n\}", text, re.S).group(1)
    assert 'proto = "tortie_blocks"' in exp and "RTS_BGP" not in exp
    assert "import none;" in text
    bird_parses(text, tmp_path)


@needs_bird
def test_no_pools_and_no_blocks_still_parses(tmp_path):
    text = bird_config(N[:1], [], [], [], "node1")
    assert bgp_names(text) == []
    bird_parses(text, tmp_path)


@needs_bird
def test_ipip_uses_tunl0_and_cross_subnet(tmp_path):
    nodes = [N[0], Node("far", "192.168.200.13/24")]
    pools = [IPPool("i", "10.65.0.0/16", mode="ipip"), IPPool("x", "10.66.0.0/16", mode="ipip", cross_subnet=True)]
    text = bird_config(nodes, [], pools, [], "node1")
    assert 'if net ~ [ 10.65.0.0/16+ ] then { ifname = "tunl0"; onlink = true; accept; }' in text
    assert 'if gw !~ 192.168.100.0/24 then { ifname = "tunl0"; onlink = true; }' in text
    assert 'route 192.168.200.13/32 via "eth0";' in text  # next hop behind the router resolves
    bird_parses(text, tmp_path)


def test_unreachable_local_routes_and_port():
    text = bird_config(N[:2], [], POOLS, BLOCKS, "node1", local_route="unreachable", listen_port=1179)
    assert "route 10.65.1.0/26 unreachable;" in text
    assert "neighbor 192.168.100.12 port 1179" in text


def test_rendering_is_deterministic():
    a = bird_config(N, [BGPPeer("p", "192.168.100.1", 1)], POOLS, BLOCKS, "node2")
    b = bird_config(list(reversed(N)), [BGPPeer("p", "192.168.100.1", 1)], list(POOLS), list(reversed(BLOCKS)), "node2")
    assert a == b


def test_protocol_name():
    assert protocol_name("Peer", "tor-a.rack1") == "Peer_tor_a_rack1"


SHOW_PROTOCOLS = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     2024-05-01 10:00:00  
direct1    Direct     ---        up     2024-05-01 10:00:00  
tortie_blocks Static     master4    up     2024-05-01 10:00:00  
kernel1    Kernel     master4    up     2024-05-01 10:00:00  
Mesh_192_168_100_12 BGP        ---        up     2024-05-01 10:00:01  Established   
Mesh_192_168_100_13 BGP        ---        start  10:00:01.123  Active        Socket: Connection refused
"""


def test_parse_protocols():
    rows = parse_protocols(SHOW_PROTOCOLS)
    assert [r.name for r in rows] == ["device1", "direct1", "tortie_blocks", "kernel1",
                                      "Mesh_192_168_100_12", "Mesh_192_168_100_13"]
    bgp = [r for r in rows if r.proto == "BGP"]
    assert bgp[0].state == "up" and bgp[0].info == "Established"
    assert bgp[1].state == "start" and bgp[1].info == "Active Socket: Connection refused"


@needs_bird
def test_daemon_rejects_bad_config_and_keeps_good_one(tmp_path):
    d = BirdDaemon(str(tmp_path))
    good = bird_config(N[:2], [], POOLS, BLOCKS, "node1")
    d._write(good)  # what ensure() does before starting bird
    with pytest.raises(BirdError, match="BIRD rejected the config"):
        d._write(good + "protocol nonsense {\n")
    assert d.current_config() == good
    assert [f for f in os.listdir(tmp_path) if f != "bird.conf"] == []  # no temp files left
    with pytest.raises(BirdError, match="BIRD rejected the config"):
        d.ensure("router id banana;\n")
    assert d.current_config() == good and not d.running()


@needs_bird
def test_passwords_are_includes_never_text(tmp_path):
    """Sessions with a password file include a file the agent writes; the rendered config
    holds only paths.  The mesh password covers node sessions; a BGPPeer its own."""
    from felix_agent.dataplane.bird_secrets import write_includes

    secrets = tmp_path / "secrets"
    peer = BGPPeer("tor", "192.168.100.1", 65001, password_file=str(tmp_path / "tor.pw"))
    text = bird_config(N[:2], [peer], POOLS, BLOCKS, "node1", mesh_password_file=str(tmp_path / "mesh.pw"),
                       secrets_dir=str(secrets))
    mesh, tor = protocol_block(text, "Mesh_192_168_100_12"), protocol_block(text, "Peer_tor")
    assert f'include "{secrets}/Mesh_192_168_100_12.conf";' in mesh and "mesh.pw" in mesh
    assert f'include "{secrets}/Peer_tor.conf";' in tor
    (tmp_path / "mesh.pw").write_text("m3sh-Secret\n")
    (tmp_path / "tor.pw").write_text('bad"quote')
    wanted = {f"{secrets}/Mesh_192_168_100_12.conf": str(tmp_path / "mesh.pw"),
              f"{secrets}/Peer_tor.conf": str(tmp_path / "tor.pw")}
    changed, problems = write_includes(wanted, str(secrets))
    assert changed and list(problems.values()) == [
        f"password in {tmp_path}/tor.pw has a quote, a backslash or a control character, which BIRD cannot take"]
    assert (secrets / "Mesh_192_168_100_12.conf").read_text() == 'password "m3sh-Secret";\n'
    assert oct(os.stat(secrets / "Mesh_192_168_100_12.conf").st_mode & 0o777) == "0o600"
    assert oct(os.stat(secrets).st_mode & 0o777) == "0o700"
    assert "m3sh-Secret" not in text and "bad" not in text
    bird_parses(text, tmp_path)
    assert write_includes(wanted, str(secrets)) == (False, problems)  # nothing to rewrite
    (tmp_path / "mesh.pw").write_text("rotated")
    assert write_includes(wanted, str(secrets))[0]
    # without passwords: no include, and stale include files are removed
    assert "include" not in bird_config(N[:2], [], POOLS, BLOCKS, "node1")
    assert write_includes({}, str(secrets))[0] and os.listdir(secrets) == []


def test_password_without_secrets_dir_is_an_error():
    with pytest.raises(ValueError, match="secrets_dir"):
        bird_config(N[:2], [], POOLS, BLOCKS, "node1", mesh_password_file="/etc/pw")
