"""The runtime's side of CNI, for tests, benchmarks and the demo: execute a plugin the
way containerd/libcni does (CNI_* environment + config on stdin, inside the node's
namespace), and run a conflist in order, passing each plugin's result to the next as
prevResult and the declared capabilities as runtimeConfig.  Not used by the plugin."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field


@dataclass
class Attachment:
    """The attachment parameters a runtime supplies for one container interface."""
    container_id: str
    netns: str  # path, e.g. /var/run/netns/<pod ns>
    ifname: str = "eth0"
    cni_args: str = ""  # "IgnoreUnknown=1;K8S_POD_NAMESPACE=...;K8S_POD_NAME=..."
    cni_path: str = "/usr/lib/cni"


@dataclass
class PluginRun:
    returncode: int
    stdout: str
    stderr: str
    output: dict | None = None  # stdout as JSON when it is JSON

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def k8s_args(namespace: str, pod: str, container_id: str = "") -> str:
    parts = ["IgnoreUnknown=1", f"K8S_POD_NAMESPACE={namespace}", f"K8S_POD_NAME={pod}"]
    if container_id:
        parts.append(f"K8S_POD_INFRA_CONTAINER_ID={container_id}")
    return ";".join(parts)


def invoke(argv: list[str], command: str, conf: dict | bytes | str, att: Attachment | None = None,
           node_ns: str | None = None, cni_path: str | None = None, timeout: float = 60,
           extra_env: dict[str, str] | None = None) -> PluginRun:
    """Run one plugin command.  `node_ns` runs it inside that namespace (ip netns exec)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env["CNI_COMMAND"] = command
    env["CNI_PATH"] = cni_path or (att.cni_path if att else "/usr/lib/cni")
    if att is not None:
        env.update({"CNI_CONTAINERID": att.container_id, "CNI_IFNAME": att.ifname})
        if att.netns:
            env["CNI_NETNS"] = att.netns
        if att.cni_args:
            env["CNI_ARGS"] = att.cni_args
    env.update(extra_env or {})
    data = conf if isinstance(conf, (bytes, str)) else json.dumps(conf)
    if isinstance(data, str):
        data = data.encode()
    cmd = ["ip", "netns", "exec", node_ns, *argv] if node_ns else list(argv)
    p = subprocess.run(cmd, input=data, capture_output=True, env=env, timeout=timeout)
    out = p.stdout.decode(errors="replace")
    run = PluginRun(p.returncode, out, p.stderr.decode(errors="replace"))
    try:
        run.output = json.loads(out) if out.strip() else None
    except ValueError:
        run.output = None
    return run


class ChainError(RuntimeError):
    def __init__(self, plugin: str, run: PluginRun) -> None:
        super().__init__(f"{plugin} failed ({run.returncode}): {run.stdout.strip() or run.stderr.strip()}")
        self.plugin = plugin
        self.run = run


@dataclass
class ConfList:
    """A network configuration list and how to execute its plugin types."""
    conf: dict  # {"cniVersion", "name", "plugins": [...]}
    executables: dict[str, list[str]] = field(default_factory=dict)  # type -> argv

    def _plugin_conf(self, i: int, runtime_config: dict, prev: dict | None) -> dict:
        p = dict(self.conf["plugins"][i])
        p["cniVersion"] = self.conf["cniVersion"]  # the list's name and version win
        p["name"] = self.conf["name"]
        caps = {k for k, v in (p.get("capabilities") or {}).items() if v}
        rc = {k: v for k, v in runtime_config.items() if k in caps}
        if rc:
            p["runtimeConfig"] = rc
        if prev is not None:
            p["prevResult"] = prev
        return p

    def _argv(self, i: int) -> list[str]:
        t = self.conf["plugins"][i]["type"]
        if t in self.executables:
            return self.executables[t]
        return [os.path.join("/usr/lib/cni", t)]

    def add(self, att: Attachment, node_ns: str | None = None, runtime_config: dict | None = None) -> dict:
        prev = None
        for i in range(len(self.conf["plugins"])):
            run = invoke(self._argv(i), "ADD", self._plugin_conf(i, runtime_config or {}, prev), att, node_ns)
            if not run.ok:
                raise ChainError(self.conf["plugins"][i]["type"], run)
            prev = run.output
        return prev or {}

    def delete(self, att: Attachment, node_ns: str | None = None, runtime_config: dict | None = None,
               prev: dict | None = None) -> None:
        for i in reversed(range(len(self.conf["plugins"]))):
            run = invoke(self._argv(i), "DEL", self._plugin_conf(i, runtime_config or {}, prev), att, node_ns)
            if not run.ok:
                raise ChainError(self.conf["plugins"][i]["type"], run)

    def check(self, att: Attachment, prev: dict, node_ns: str | None = None,
              runtime_config: dict | None = None) -> None:
        for i in range(len(self.conf["plugins"])):
            run = invoke(self._argv(i), "CHECK", self._plugin_conf(i, runtime_config or {}, prev), att, node_ns)
            if not run.ok:
                raise ChainError(self.conf["plugins"][i]["type"], run)
