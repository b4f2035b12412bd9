"""A fast reachability prober for the netns lab: ONE long-lived process per namespace.

Spawning a process per probe costs ~50 ms of interpreter start-up, so an 81-pair x 4-port
matrix would take most of a minute.  Instead every source namespace runs PROBER_SOURCE
(stdlib only) once; the test writes a whole batch of probes as one JSON line on its
stdin, the prober runs the batch concurrently (one thread per probe) and answers one JSON
line with a verdict per probe, in order.  A matrix therefore costs about one timeout:
allowed probes answer in milliseconds, denied ones (dropped, never refused) cost exactly
their timeout.

Verdicts: "ok" (TCP/SCTP handshake completed, or the UDP echo answered), "timeout"
(nothing came back: the policy dropped it), "refused" (a RST or ICMP unreachable came back:
the packet got through but nothing listened, a harness problem, not a policy verdict), or
"error:<errno>:<text>".

A second request form serves latency measurements: `Prober.until` makes the prober fire
one probe every `interval` until one ends the wanted way, and answers when that probe was
sent (time.monotonic(), a system-wide clock the caller shares).

    p = Prober(lab, pod.ns, name="x/a")
    p.run([Probe("10.65.0.5", 80, "tcp", timeout=0.5)])      # -> ["ok"]
    probe_matrix({"x/a": p, ...}, {"x/b": "10.65.0.6", ...}, [("tcp", 80), ("udp", 80)])
    p.until(Probe("10.65.0.6", 80, "tcp", 0.3), OK)         # -> (sent_at, probes)

The module also holds the helpers the policy scale test and benchmark share: synthetic
endpoints (records without a real pod), a census of the cali chains and ipsets a node
has programmed, and the anti-spoofing DROP's packet counter (either family).
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

from felix_agent.datastore.etcd import EtcdStore
from felix_agent.model import Pod, WorkloadEndpoint, labels_of

from tests.lab.netns import Lab, sh

# The program each prober runs.  With --serve-sctp PORT it also listens on SCTP (the lab's
# shared server, LabCluster.serve, speaks TCP and UDP only).
PROBER_SOURCE = r"""
import json, socket, sys, threading
SCTP = getattr(socket, "IPPROTO_SCTP", 132)

def serve_sctp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, SCTP)  # V6ONLY off: IPv4 too
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port)); s.listen(256)
    while True:
        c, _ = s.accept(); c.close()

def probe(req, out, i):
    proto = req["proto"]
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    family = socket.AF_INET6 if ":" in req["ip"] else socket.AF_INET
    s = socket.socket(family, kind, SCTP if proto == "sctp" else 0)
    s.settimeout(req["timeout"])
    try:
        if req.get("src"):
            s.bind((req["src"], 0))
        s.connect((req["ip"], req["port"]))
        if proto == "udp":
            s.send(b"probe")
            s.recv(64)
        out[i] = "ok"
    except socket.timeout:
        out[i] = "timeout"
    except ConnectionRefusedError:
        out[i] = "refused"
    except OSError as e:
        out[i] = "error:%s:%s" % (e.errno, e.strerror)
    finally:
        s.close()

def until(req):
    # Fire one probe every `interval` until one ends as `want`; answer the monotonic send
    # time of the earliest such probe (None at the deadline).
    import time
    found, lock, stop, threads = [], threading.Lock(), threading.Event(), []
    def attempt(t0):
        out = [None]
        probe(req, out, 0)
        if out[0] == req["want"]:
            with lock:
                found.append(t0)
            stop.set()
    end = time.monotonic() + req["deadline"]
    while not stop.is_set() and time.monotonic() < end:
        t = threading.Thread(target=attempt, args=(time.monotonic(),))
        t.start()
        threads.append(t)
        stop.wait(req["interval"])
    for t in threads:
        t.join()
    return {"t": min(found) if found else None, "attempts": len(threads)}

if "--serve-sctp" in sys.argv:
    port = int(sys.argv[sys.argv.index("--serve-sctp") + 1])
    threading.Thread(target=serve_sctp, args=(port,), daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    reqs = json.loads(line)
    if isinstance(reqs, dict):
        sys.stdout.write(json.dumps(until(reqs)) + "\n")
        sys.stdout.flush()
        continue
    out = [None] * len(reqs)
    threads = [threading.Thread(target=probe, args=(r, out, i)) for i, r in enumerate(reqs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""

OK, TIMEOUT, REFUSED = "ok", "timeout", "refused"

Port = tuple[str, int]  # ("tcp", 80)
Pair = tuple[str, str]  # (source name, destination name)


@dataclass(frozen=True)
class Probe:
    ip: str
    port: int
    proto: str = "tcp"  # tcp | udp | sctp
    timeout: float = 0.5
    src: str = ""  # bind to this source address first ("" = the kernel's choice)


class ProberError(RuntimeError):
    pass


class Prober:
    """The prober process of one namespace.  Killed with the lab (Lab.popen)."""

    def __init__(self, lab: Lab, ns: str, name: str = "", serve_sctp: int | None = None):
        self.ns, self.name = ns, name or ns
        argv = [sys.executable, "-c", PROBER_SOURCE]
        if serve_sctp:
            argv += ["--serve-sctp", str(serve_sctp)]
        self.proc = lab.popen(ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, bufsize=1)
        if self._readline(15) != "ready":
            raise ProberError(f"prober in {ns} did not start: {self._stderr()}")

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return (self.proc.stderr.read() or "").strip()[-2000:]

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise ProberError(f"prober {self.name}: no answer within {timeout:.1f}s")
        line = self.proc.stdout.readline()
        if not line:
            raise ProberError(f"prober {self.name} exited: {self._stderr()}")
        return line.strip()

    def submit(self, probes: Sequence[Probe]) -> None:
        self.proc.stdin.write(json.dumps([asdict(p) for p in probes]) + "\n")
        self.proc.stdin.flush()

    def collect(self, timeout: float) -> list[str]:
        return json.loads(self._readline(timeout))

    def run(self, probes: Sequence[Probe]) -> list[str]:
        self.submit(probes)
        return self.collect(max((p.timeout for p in probes), default=0) + 10)


    def until(self, probe: Probe, want: str, interval: float = 0.02, deadline: float = 30.0) -> tuple[float | None, int]:
        """Probe every `interval` s until a probe ends as `want` (OK or TIMEOUT); returns the
        time.monotonic() at which that probe was sent (the clock is system-wide, so it
        compares with the caller's) or None at the deadline, and the number of probes."""
        self.proc.stdin.write(json.dumps({**asdict(probe), "want": want, "interval": interval,
                                          "deadline": deadline}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self._readline(deadline + probe.timeout + 10))
        return answer["t"], answer["attempts"]


def run_batches(batches: Mapping[str, tuple[Prober, Sequence[Probe]]]) -> dict[str, list[str]]:
    """Send every batch first, then collect: all namespaces probe at the same time."""
    for prober, probes in batches.values():
        prober.submit(probes)
    longest = max((p.timeout for _, probes in batches.values() for p in probes), default=0)
    return {key: prober.collect(longest + 10) for key, (prober, _) in batches.items()}


def probe_matrix(probers: Mapping[str, Prober], targets: Mapping[str, str], ports: Iterable[Port],
                 timeout: float = 0.5) -> dict[Port, dict[Pair, str]]:
    """Every source x every target x every port, concurrently; verdicts by port and pair."""
    ports = list(ports)
    plan = [(dst, port) for dst in targets for port in ports]
    batches = {src: (p, [Probe(targets[dst], port[1], port[0], timeout) for dst, port in plan])
               for src, p in probers.items()}
    answers = run_batches(batches)
    out: dict[Port, dict[Pair, str]] = {port: {} for port in ports}
    for src, verdicts in answers.items():
        for (dst, port), verdict in zip(plan, verdicts):
            out[port][(src, dst)] = verdict
    return out


def flush_conntrack(namespaces: Iterable[str]) -> None:
    """Forget tracked connections, so a UDP probe that happens to reuse an earlier probe's
    source port is judged by policy again instead of riding an old ESTABLISHED entry."""
    for ns in namespaces:
        sh("conntrack", "-F", ns=ns, check=False)


def sctp_available(lab: Lab, ns: str) -> bool:
    """Whether the kernel speaks SCTP, asked inside a lab namespace."""
    code = "import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)"
    return sh(sys.executable, "-c", code, ns=ns, check=False).returncode == 0


# --- reading and printing matrices -------------------------------------------------------

def render_table(names: Sequence[str], cell) -> list[str]:
    """A from (rows) x to (columns) table; cell(src, dst) returns a short string."""
    w = max(6, *(len(n) for n in names)) + 1
    lines = ["from\\to".ljust(w) + "".join(n.rjust(w) for n in names)]
    for src in names:
        lines.append(src.ljust(w) + "".join(cell(src, dst).rjust(w) for dst in names))
    return lines


def matrix_diff(names: Sequence[str], expected: Mapping[Port, Mapping[Pair, bool]],
                observed: Mapping[Port, Mapping[Pair, str]]) -> str:
    """'' when every observed verdict is what `expected` says; otherwise, per port that
    differs, the expected and observed tables ('.' allowed, 'X' denied; observed cells
    that differ are marked '!', verdicts other than ok/timeout are spelled out) and a
    list of the wrong pairs."""
    out: list[str] = []
    for port, exp in expected.items():
        obs = observed[port]
        wrong = [(s, d) for s in names for d in names if (obs[(s, d)] == OK) != exp[(s, d)]
                 or obs[(s, d)] not in (OK, TIMEOUT)]
        if not wrong:
            continue

        def shown(s, d):
            v = obs[(s, d)]
            mark = "." if v == OK else "X" if v == TIMEOUT else v[:4]
            return ("!" + mark) if (s, d) in wrong else mark

        out.append(f"== {port[0]}/{port[1]}: {len(wrong)} of {len(names) ** 2} pairs wrong")
        out += ["expected:"] + render_table(names, lambda s, d: "." if exp[(s, d)] else "X")
        out += ["observed:"] + render_table(names, shown)
        out += [f"  {s} -> {d}: expected {'allowed' if exp[(s, d)] else 'denied'}, got {obs[(s, d)]}"
                for s, d in wrong]
    return "\n".join(out)


def wait_matrix(probe, expected: Mapping[Port, Mapping[Pair, bool]], names: Sequence[str],
                deadline: float = 15.0, timeouts: Sequence[float] = (0.5, 0.8, 1.2)) -> tuple[int, float]:
    """Probe (probe(timeout) -> observed) until one complete pass equals `expected` exactly.

    A pass can differ while the agents are still programming, or because a loaded machine
    answered an allowed probe late (a spurious "denied"); a spurious "allowed" cannot
    happen (it needs a real answer).  So retrying until one whole pass matches is exact
    for the final state.  Later passes use longer timeouts.  Returns (passes, seconds);
    raises AssertionError with the readable diff of the last pass at the deadline."""
    t0 = time.monotonic()
    passes = 0
    while True:
        observed = probe(timeouts[min(passes, len(timeouts) - 1)])
        passes += 1
        diff = matrix_diff(names, expected, observed)
        if not diff:
            return passes, time.monotonic() - t0
        if time.monotonic() - t0 > deadline:
            raise AssertionError(f"reachability differs from the expected truth table after "
                                 f"{passes} passes / {deadline:.0f}s:\n{diff}")
        time.sleep(0.1)


# --- scale helpers: synthetic endpoints and a census of what the agent programmed -----------

def synthetic_endpoints(namespace: str, prefix: str, count: int, node: str, labels: Mapping[str, str],
                        first_ip: str, wired: bool = True, start: int = 0) -> list:
    """`count` endpoints WITHOUT a real pod, for scale: a Pod record (labels, its IP in
    status) and, when `wired`, a WorkloadEndpoint on `node` with a made-up cali interface,
    exactly what a CNI ADD would have recorded.  Remote ones (wired=False, or another node)
    only fill ipsets.  A node's agent is the authority on its own endpoints: it keeps a
    WorkloadEndpoint of its node only when the interface exists as it starts (it adopts
    what it finds wired, as after a restart) and deletes the others, so bench_policy.py
    creates a veth per synthetic endpoint before starting the agent.  Addresses count up
    from `first_ip`; names are <prefix>-<n>."""
    base = int(ipaddress.ip_address(first_ip))
    records: list = []
    for i in range(start, start + count):
        name, ip = f"{prefix}-{i}", str(ipaddress.ip_address(base + i))
        records.append(Pod(namespace=namespace, name=name, labels=labels_of(dict(labels)), node=node, ips=(ip,)))
        if wired:
            iface = "cali" + hashlib.sha1(f"{namespace}.{name}".encode()).hexdigest()[:11]
            records.append(WorkloadEndpoint(namespace=namespace, pod=name, node=node,
                                            container_id=f"synthetic-{name}", iface=iface, ips=(ip,)))
    return records


def write_records(etcd_endpoint: str, records: Sequence, chunk: int = 100) -> None:
    """Write model records straight into the datastore, as tortiectl does, in transactions of
    `chunk` (etcd caps the operations of one transaction)."""
    async def go() -> None:
        store = EtcdStore.from_endpoint(etcd_endpoint)
        try:
            for i in range(0, len(records), chunk):
                await store.put_records(list(records[i:i + chunk]))
        finally:
            await store.close()

    asyncio.run(go())


@dataclass(frozen=True)
class Census:
    """What the agent programmed in one node namespace."""

    rules: int  # every rule in the filter table's cali chains
    policy_rules: int  # rules in cali-pi-*/cali-po-* chains
    chains: int  # cali chains in the filter table
    policy_chains: int
    sets: Mapping[str, int]  # cali40 (IPv6: cali60) ipset -> members
    text: str  # the cali chains as iptables-save prints them, counters stripped

    @property
    def members(self) -> int:
        return sum(self.sets.values())


def census(node_ns: str, family: int = 4) -> Census:
    """What the agent programmed for IP `family`: its filter table chains and its sets."""
    out = ""
    tool = "iptables" if family == 4 else "ip6tables"
    for cmd in (f"{tool}-save", f"{tool}-legacy-save"):
        out = sh(cmd, "-t", "filter", ns=node_ns, check=False).stdout
        if ":cali-FORWARD" in out:
            break
    lines = [ln.split(" [")[0] if ln.startswith(":") else ln for ln in out.splitlines()
             if ln.startswith((":cali-", "-A cali-"))]
    rules = [ln for ln in lines if ln.startswith("-A ")]
    chains = [ln for ln in lines if ln.startswith(":")]
    sets: dict[str, int] = {}
    for ln in sh("ipset", "save", ns=node_ns, check=False).stdout.splitlines():
        parts = ln.split()
        if len(parts) >= 2 and parts[1].startswith(f"cali{family}0"):
            if parts[0] == "create":
                sets.setdefault(parts[1], 0)
            elif parts[0] == "add":
                sets[parts[1]] = sets.get(parts[1], 0) + 1
    return Census(rules=len(rules),
                  policy_rules=sum(1 for r in rules if r.startswith(("-A cali-pi-", "-A cali-po-"))),
                  chains=len(chains),
                  policy_chains=sum(1 for c in chains if c.startswith((":cali-pi-", ":cali-po-"))),
                  sets=sets, text="\n".join(sorted(lines)))


def filter_save(node_ns: str, family: int = 4) -> str:
    """<ip[6]tables>-save -c of the filter table of IP `family` in whichever backend holds
    the agent's chains."""
    tool = "iptables" if family == 4 else "ip6tables"
    for cmd in (f"{tool}-save", f"{tool}-legacy-save"):
        out = sh(cmd, "-c", "-t", "filter", ns=node_ns, check=False).stdout
        if ":cali-from-wl-dispatch" in out:
            return out
    raise AssertionError(f"no cali-from-wl-dispatch chain in the {tool} of {node_ns}")


def anti_spoof_drops(node_ns: str, family: int = 4) -> int:
    """Packets counted by the anti-spoofing DROP at the top of cali-from-wl-dispatch (a
    source address and input interface that are not a pair of cali40wl-src; IPv6:
    cali60wl-src)."""
    found = re.findall(r"^\[(\d+):\d+\] -A cali-from-wl-dispatch(?: -m comment --comment \S+)? "
                       rf"-m set ! --match-set cali{family}0wl-src src,src -j DROP$", filter_save(node_ns, family),
                       re.M)
    assert len(found) == 1, f"cali-from-wl-dispatch (IPv{family}) has no anti-spoofing DROP rule"
    return int(found[0])
