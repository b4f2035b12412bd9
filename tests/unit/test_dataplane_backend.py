"""Backend naming and rule counting (detection itself runs in the lab: integration tests),
and cmd.run's error reporting."""
import pytest

from felix_agent.dataplane import cmd
from felix_agent.dataplane.backend import BackendError, command, count_rules, detect


def test_command_names():
    assert command("nft", "save") == "iptables-nft-save"
    assert command("legacy", "restore", 6) == "ip6tables-legacy-restore"
    with pytest.raises(BackendError, match="unknown iptables backend"):
        command("ebpf", "save")


def test_count_rules_with_and_without_counters():
    text = ("# Generated\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n"
            "[1:2] -A INPUT -j DROP\nCOMMIT\n*nat\n:X - [0:0]\n-A X -j RETURN\nCOMMIT\n")
    assert count_rules(text) == 3
    assert count_rules("") == 0


def test_detect_rejects_bad_config():
    with pytest.raises(BackendError, match="must be one of"):
        detect(configured="iptables")


def test_run_names_a_missing_command():
    with pytest.raises(cmd.CommandNotFound, match="'iptables-frob-save' not found"):
        cmd.run(["iptables-frob-save"])
    assert "(apt package ipset)" in str(cmd.CommandNotFound("ipset"))


def test_run_reports_failures_with_stderr():
    with pytest.raises(cmd.CommandError, match=r"failed \(3\): boom"):
        cmd.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert cmd.run(["sh", "-c", "exit 3"], check=False).returncode == 3
    assert cmd.run(["cat"], input="hi").stdout == "hi"
    with pytest.raises(cmd.CommandError, match="does not exist"):
        cmd.run(["true"], netns="tortie-no-such-netns")
    assert cmd.wrap_argv(["a"], "ns1") == ["ip", "netns", "exec", "ns1", "a"]
