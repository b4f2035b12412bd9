"""The sysctl driver (felix_agent.dataplane.sysctls): the node's IPv4 forwarding, route_localnet
on pod veths, and how a node that cannot forward shows in /readyz.  /proc/sys is stood in for
by a directory of plain files (proc_sys): a unit test must never write the root namespace's
/proc/sys; the lab (tests/integration/test_hostile_pod.py) and the kube lab (tests/kube) cover the
real files in node namespaces."""
import pytest

from felix_agent.agent.health import Health
from felix_agent.dataplane import sysctls
from felix_agent.dataplane.sysctls import SysctlDriver


@pytest.fixture
def proc(tmp_path):
    (tmp_path / "net/ipv4/conf").mkdir(parents=True)
    (tmp_path / "net/ipv4/ip_forward").write_text("0\n")
    return tmp_path


def veth(proc, name: str, route_localnet: str) -> None:
    (proc / "net/ipv4/conf" / name).mkdir()
    (proc / "net/ipv4/conf" / name / "route_localnet").write_text(route_localnet + "\n")


def test_turns_forwarding_on(proc):
    res = SysctlDriver(proc_sys=str(proc)).apply(full=True)
    assert res.changes == {"forwarding": "net.ipv4.ip_forward=1"} and not res.problems
    assert (proc / "net/ipv4/ip_forward").read_text().strip() == "1"
    res = SysctlDriver(proc_sys=str(proc)).apply(full=True)
    assert not res.changes and not res.problems  # already on: nothing written


def test_check_only_reports(proc):
    res = SysctlDriver(ensure_forwarding=False, proc_sys=str(proc)).apply(full=True)
    problem = res.problems["forwarding"]
    assert not res.changes and "net.ipv4.ip_forward is 0" in problem and "ensure_forwarding is off" in problem
    assert (proc / "net/ipv4/ip_forward").read_text().strip() == "0"


def test_refused_write_is_reported(proc, monkeypatch):
    # root may write a read-only file: the refusal of a read-only /proc/sys is stood in for
    def refuse(path, value):
        raise PermissionError(30, "Read-only file system")
    monkeypatch.setattr(sysctls, "_write", refuse)
    res = SysctlDriver(proc_sys=str(proc)).apply(full=True)
    assert not res.changes and "cannot be set" in res.problems["forwarding"]
    assert "Read-only file system" in res.problems["forwarding"]


def test_unreadable_is_reported(tmp_path):
    res = SysctlDriver(proc_sys=str(tmp_path / "missing")).apply(full=True)
    assert res.problems["forwarding"].startswith("cannot read net.ipv4.ip_forward")


def test_route_localnet_reset_on_pod_veths_only(proc):
    veth(proc, "cali1234", "1")
    veth(proc, "cali5678", "0")
    veth(proc, "eth0", "1")  # not ours: left as it is
    res = SysctlDriver(proc_sys=str(proc)).apply(full=True)
    assert res.changes["route_localnet_reset"] == 1
    assert (proc / "net/ipv4/conf/cali1234/route_localnet").read_text().strip() == "0"
    assert (proc / "net/ipv4/conf/eth0/route_localnet").read_text().strip() == "1"
    assert "route_localnet_reset" not in SysctlDriver(proc_sys=str(proc)).apply(full=True).changes


def test_fault_makes_the_node_unready_and_says_why():
    h = Health(in_sync=True, programmed=True)
    assert h.ready
    h.faults = {"forwarding": "net.ipv4.ip_forward is 0 and cannot be set"}
    rep = h.report()
    assert not h.ready and not rep["ready"] and rep["reasons"]["forwarding"].startswith("net.ipv4.ip_forward")
