"""The netns lab: a reusable test library (pytest fixtures in tests/lab/plugin.py, plain
functions here) that tests, the demo and the benchmarks share."""
from tests.lab.etcd import Etcd, free_port
from tests.lab.netns import Lab, LabError, LabNode, delete_namespaces, list_namespaces, new_prefix, sh, tcp_probe
from tests.lab.tools import cni_plugin_path, is_root, kernel_has, missing_tools, require_tools

__all__ = [
    "Etcd", "free_port", "Lab", "LabError", "LabNode", "delete_namespaces", "list_namespaces",
    "new_prefix", "sh", "tcp_probe", "cni_plugin_path", "is_root", "kernel_has", "missing_tools",
    "require_tools",
]
