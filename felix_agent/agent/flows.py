"""Flow logs, the agent's half: packets the calc's NFLOG rules log (calc/flowlog.py), read
on a thread of their own (dataplane/nflog.py) and aggregated into flows for /flows
(`tortiectl flows`) and the Prometheus counters.

A flow is (source, destination, protocol, destination port, the log rule's id): the
verdict and the policy that decided come with the id (DesiredState.flow_rules, given after
every pass).  Memory is bounded: at most `max_flows` flows, the least recently seen
evicted first (counted).  Work is bounded: the kernel logs at most the rules' rates
(per flow and per rule) and batches packets per message; nothing here runs on the event
loop or on a packet's path.  Addresses are named (namespace/pod, node) when served, from
the names the loop hands over, so a pod that appears after its first packet is named too.
When the group cannot be read (no nfnetlink_log, another listener) the agent runs on and
its status says why.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

from felix_agent import metrics
from felix_agent.calc.cluster import Cluster
from felix_agent.calc.desired import FlowRule
from felix_agent.dataplane.nflog import LoggedPacket, NflogSocket, NflogUnavailable
from felix_agent.logs import kv

log = logging.getLogger("tortie.flows")


@dataclass
class Flow:
    src: str
    dst: str
    proto: str
    dport: int
    verdict: str  # "deny" | "allow" (the prefix's letter: known even when the id is not)
    rule_id: str
    rule: FlowRule | None  # None: an id the calc has not (or no longer) named
    packets: int
    first_seen: float  # wall clock
    last_seen: float
    seq: int  # the table's update counter when last seen (for --follow)


class FlowTable:
    """The aggregation, thread-safe: the reader thread adds, the HTTP thread reads."""

    def __init__(self, max_flows: int):
        if max_flows < 1:
            raise ValueError(f"max_flows must be >= 1, not {max_flows}")
        self.max_flows = max_flows
        self.evicted = 0
        self.seq = 0
        self._flows: OrderedDict[tuple, Flow] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, packets: list[LoggedPacket], rules: Mapping[str, FlowRule], now: float) -> Counter:
        """Counts `packets`; returns the logged packets by (verdict, tier, policy)."""
        by_policy: Counter = Counter()
        with self._lock:
            for p in packets:
                letter, _, rule_id = p.prefix.partition(":")
                key = (p.src, p.dst, p.proto, p.dport, rule_id)
                self.seq += 1
                flow = self._flows.get(key)
                if flow is None:
                    flow = self._flows[key] = Flow(p.src, p.dst, p.proto, p.dport,
                                                   "deny" if letter == "D" else "allow", rule_id,
                                                   rules.get(rule_id), 0, now, now, 0)
                    if len(self._flows) > self.max_flows:
                        self._flows.popitem(last=False)
                        self.evicted += 1
                        metrics.FLOW_EVICTIONS.inc()
                else:
                    self._flows.move_to_end(key)
                    if flow.rule is None:
                        flow.rule = rules.get(rule_id)
                flow.packets += 1
                flow.last_seen, flow.seq = now, self.seq
                r = flow.rule
                by_policy[(flow.verdict, r.tier, r.policy) if r else (flow.verdict, "unknown", rule_id)] += 1
        return by_policy

    def flows(self, since: int = 0) -> list[Flow]:
        """Flows seen after update `since`, most recent last (copies)."""
        with self._lock:
            return [Flow(**vars(f)) for f in self._flows.values() if f.seq > since]

    def __len__(self) -> int:
        return len(self._flows)


def address_names(cluster: Cluster) -> dict[str, str]:
    """address -> "namespace/pod" (every node's pods) or "node <name>"."""
    names = {canonical(n.ip.split("/")[0]): f"node {n.name}" for n in cluster.nodes.values() if n.ip}
    for ep in cluster.endpoints():
        for ip in ep.ips:
            names[canonical(ip)] = f"{ep.namespace}/{ep.pod}"
    return names


def canonical(ip: str) -> str:
    """The form the packet parser prints (an IPv6 address has many spellings: "fd00:0::5"
    is "fd00::5"), so a logged address finds its name."""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


class FlowLog:
    """The NFLOG reader thread and its table.  `start()` never raises: a group the kernel
    refuses leaves state "unavailable" with the reason."""

    def __init__(self, group: int, max_flows: int, netns: str | None = None,
                 opener: Callable[..., NflogSocket] = NflogSocket):
        self.group = group
        self.netns = netns
        self.table = FlowTable(max_flows)
        self.state = "starting"
        self.reason = ""
        self._opener = opener
        self._rules: Mapping[str, FlowRule] = {}
        self._names: Mapping[str, str] = {}
        self._names_version: tuple[int, ...] | None = None
        self._sock: NflogSocket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._sock = self._opener(self.group, self.netns)
        except (NflogUnavailable, OSError) as e:
            self.state, self.reason = "unavailable", str(e)
            log.error("flow logs unavailable; the agent runs without them", extra=kv(error=e))
            return
        self.state = "on"
        self._thread = threading.Thread(target=self._run, name="flow-log", daemon=True)
        self._thread.start()
        log.info("flow logs on", extra=kv(nflog_group=self.group, max_flows=self.table.max_flows))

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        overruns = 0
        while not self._stop.is_set():
            try:
                packets = sock.read(0.5)
            except OSError as e:  # the socket is gone: say so rather than spin
                if not self._stop.is_set():
                    self.state, self.reason = "unavailable", f"reading NFLOG group {self.group}: {e}"
                    log.error("flow log reader stopped", extra=kv(error=e))
                return
            except Exception as e:  # noqa: BLE001 - one bad batch must not end the flow log
                log.warning("flow log: a batch could not be read; skipped", extra=kv(error=repr(e)))
                continue
            if sock.overruns != overruns:
                metrics.FLOW_OVERRUNS.inc(sock.overruns - overruns)
                overruns = sock.overruns
            if packets:
                for (verdict, tier, policy), n in self.table.add(packets, self._rules, time.time()).items():
                    metrics.FLOW_PACKETS.labels(verdict=verdict, tier=tier, policy=policy).inc(n)
                metrics.FLOWS.set(len(self.table))

    def follow(self, rules: Mapping[str, FlowRule], cluster: Cluster) -> None:
        """After a pass (the event loop): the ids' meanings, and the addresses' names when
        pods or nodes changed.  Each is replaced whole, so the other threads read either
        the old or the new one."""
        self._rules = rules
        version = cluster.versions("Pod", "WorkloadEndpoint", "Node")
        if version != self._names_version:
            self._names_version = version
            self._names = address_names(cluster)

    def status(self) -> dict:
        sock = self._sock
        return {"state": self.state, "reason": self.reason, "nflog_group": self.group, "flows": len(self.table),
                "max_flows": self.table.max_flows, "evicted": self.table.evicted,
                "overruns": sock.overruns if sock is not None else 0}

    def document(self, denied: bool = False, namespace: str = "", since: int = 0) -> dict:
        """What /flows serves: the flows (filtered), named, and the table's state."""
        names = self._names
        out = []
        for f in self.table.flows(since):
            r = f.rule
            if denied and f.verdict != "deny":
                continue
            src, dst = names.get(f.src, ""), names.get(f.dst, "")
            if namespace and not (src.startswith(namespace + "/") or dst.startswith(namespace + "/")):
                continue
            out.append({
                "src": f.src, "src_name": src, "dst": f.dst, "dst_name": dst, "proto": f.proto, "dport": f.dport,
                "verdict": f.verdict, "direction": r.direction if r else "",
                "tier": r.tier if r else "", "policy": r.policy if r else f"(unknown rule {f.rule_id})",
                "rule": r.rule if r else -1, "rule_name": r.rule_name if r else "",
                "packets": f.packets, "first_seen": f.first_seen, "last_seen": f.last_seen, "seq": f.seq})
        return {"flows": out, "seq": self.table.seq, "flow_logs": self.status()}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
