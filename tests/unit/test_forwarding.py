"""The node's IPv4 forwarding (felix_agent.dataplane.forwarding) and how its absence shows in
/readyz.  The sysctl is stood in for by a file (proc_path): a unit test must never write the
root namespace's /proc/sys; the kube lab (tests/kube) covers the real one in node namespaces."""
from felix_agent.dataplane.forwarding import Forwarding
from felix_agent.agent.health import Health


def test_turns_forwarding_on(tmp_path):
    f = tmp_path / "ip_forward"
    f.write_text("0\n")
    assert Forwarding(proc_path=str(f)).apply() == (True, "")
    assert f.read_text().strip() == "1"
    assert Forwarding(proc_path=str(f)).apply() == (False, "")  # already on: nothing written


def test_check_only_reports(tmp_path):
    f = tmp_path / "ip_forward"
    f.write_text("0\n")
    changed, problem = Forwarding(ensure=False, proc_path=str(f)).apply()
    assert not changed and "net.ipv4.ip_forward is 0" in problem and "ensure_forwarding is off" in problem
    assert f.read_text().strip() == "0"


def test_refused_write_is_reported(tmp_path):
    f = tmp_path / "ip_forward"
    f.write_text("0\n")
    fw = Forwarding(proc_path=str(f))
    fw._write = lambda: (_ for _ in ()).throw(PermissionError(30, "Read-only file system"))
    changed, problem = fw.apply()
    assert not changed and "cannot be set" in problem and "Read-only file system" in problem


def test_unreadable_is_reported(tmp_path):
    changed, problem = Forwarding(proc_path=str(tmp_path / "missing")).apply()
    assert not changed and problem.startswith("cannot read net.ipv4.ip_forward")


def test_fault_makes_the_node_unready_and_says_why():
    h = Health(in_sync=True, programmed=True)
    assert h.ready
    h.faults = {"forwarding": "net.ipv4.ip_forward is 0 and cannot be set"}
    rep = h.report()
    assert not h.ready and not rep["ready"] and rep["reasons"]["forwarding"].startswith("net.ipv4.ip_forward")
