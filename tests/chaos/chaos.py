"""Chaos run on the netns lab (root; `make chaos`, not part of `make test`).

Parallel CNI ADD/DEL churn through the real binary (dist/tortie) on 2-3 lab nodes, each
with a real tortie-agent and BIRD, against a real etcd, while one fault at a time is
injected at random:

  agent_kill9   kill -9 an agent's process group, start it again 0.5-3 s later
  agent_stop    SIGSTOP an agent for 2-8 s, then SIGCONT
  bird_kill9    kill -9 a node's BIRD; measures the time until the agent runs it again
  etcd_kill9    kill -9 etcd, start it again (same data) 1-5 s later
  etcd_stop     SIGSTOP etcd for 2-8 s, then SIGCONT
  drift         flush cali-FORWARD on a node by hand; measures the time until restored

After each fault the injector waits for every agent's /readyz (a node that is not ready
within READY_BOUND after the fault ended is a hang).  A monitor notices agent exits the
injector did not cause (restarting the agent so the run goes on).  A CNI request that
takes longer than REQUEST_BOUND is a hang.

At the end every attachment ever added is deleted (as a runtime does after a failed ADD,
DELs are retried until they succeed), and the nodes are audited: leaked addresses, veths,
routes, ipset members, endpoint records, CNI records, and duplicate addresses seen during
the run.

    chaos.py [--minutes 10] [--seed N] [--nodes 2] [--workers 6] [--resync 5] [--json OUT]

Prints the seed first; the same seed gives the same fault schedule and churn choices
(timings on a loaded machine differ, so outcomes may too).  Exits 1 when a target is
missed: 0 unexplained agent exits, 0 hangs, BIRD back < 5 s, drift repaired within one
resync interval, 0 leaks, 0 duplicates.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TORTIE_PYTHON", sys.executable)

from tests.lab.cluster import LabCluster  # noqa: E402
from tests.lab.etcd import Etcd  # noqa: E402
from tests.lab.netns import Lab, new_prefix, sh  # noqa: E402

FAULTS = ("agent_kill9", "agent_stop", "bird_kill9", "etcd_kill9", "etcd_stop", "drift")
REQUEST_BOUND = 40.0  # s: the binary gives up after its agent_timeout (30 s); past this is a hang
READY_BOUND = 60.0  # s after a fault ended until every agent must be ready again
POOL = "10.66.0.0/16"
ETCDCTL_ENV = {**os.environ, "ETCDCTL_API": "3"}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


class Chaos:
    def __init__(self, c: LabCluster, rng: random.Random, args):
        self.c, self.rng, self.args = c, rng, args
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.adds = collections.Counter()  # "ok" or "code N"
        self.dels = collections.Counter()
        self.adds_fail_msgs = collections.Counter()  # "code N: message" -> count
        self.dels_fail_msgs = collections.Counter()
        self.faults = collections.Counter()
        self.hangs: list[str] = []
        self.exits: list[str] = []  # agent exits nobody caused
        self.bird_restart: list[float] = []
        self.drift_repair: list[float] = []
        self.recovery: list[float] = []  # fault end -> all nodes ready
        self.duplicates: list[str] = []
        self.ip_owner: dict[str, str] = {}  # ip -> container id, for live attachments
        self.to_delete: dict[str, tuple] = {}  # cid -> (node, netns, ns, pod): every ADD ever tried
        self.caused: set[str] = set()  # nodes whose agent the injector is killing right now
        self.seq = 0

    # -- churn --------------------------------------------------------------------------

    def cni(self, node: str, command: str, cid: str, netns: str, pod: str) -> tuple[bool, str, float]:
        t0 = time.monotonic()
        try:
            p = self.c.cni_run(node, command, cid, f"/var/run/netns/{netns}", "chaos", pod,
                               timeout=REQUEST_BOUND + 20)
            took = time.monotonic() - t0
            out = json.loads(p.stdout) if p.stdout.strip() else {}
        except subprocess.TimeoutExpired:
            took = time.monotonic() - t0
            with self.lock:
                self.hangs.append(f"{command} {cid} on {node}: no answer in {took:.0f}s")
            return False, "timeout", took
        except ValueError:
            out = {"code": "unparsable"}
            took = time.monotonic() - t0
        if took > REQUEST_BOUND:
            with self.lock:
                self.hangs.append(f"{command} {cid} on {node} took {took:.0f}s")
        if p.returncode == 0 and "code" not in out:
            return True, "ok", took
        return False, f"code {out.get('code')}: {str(out.get('msg', ''))[:60]}", took

    def worker(self, w: int) -> None:
        rng = random.Random(self.rng.random())
        nodes = [n.name for n in self.c.lab.nodes]
        while not self.stop.is_set():
            with self.lock:
                self.seq += 1
                seq = self.seq
            node = rng.choice(nodes)
            pod, cid = f"w{w}-{seq}", f"chaos-{w}-{seq}"
            netns = f"{self.c.lab.prefix}-p{w}-{seq}"
            sh("ip", "netns", "add", netns)
            sh("ip", "link", "set", "lo", "up", ns=netns)
            if rng.random() < 0.5:  # half the pods are bound in etcd before their ADD
                self.put_pod(pod, node)
            with self.lock:
                self.to_delete[cid] = (node, netns, pod)
            ok, why, _ = self.cni(node, "ADD", cid, netns, pod)
            with self.lock:
                self.adds["ok" if ok else why.split(":")[0]] += 1
                if not ok:
                    self.adds_fail_msgs[why] += 1
            if ok:
                self.note_ip(cid, node, netns)
            time.sleep(rng.uniform(0.0, 2.0))
            self.delete(cid)

    def put_pod(self, pod: str, node: str) -> None:
        obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": "chaos",
                                                               "labels": {"app": pod}},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]}}
        subprocess.run(["etcdctl", f"--endpoints={self.c.etcd.endpoint}", "--command-timeout=2s", "put",
                        f"/tortie/pods/chaos/{pod}", json.dumps(obj)], env=ETCDCTL_ENV,
                       capture_output=True, timeout=10)

    def note_ip(self, cid: str, node: str, netns: str) -> None:
        out = sh("ip", "-4", "-o", "addr", "show", "dev", "eth0", ns=netns, check=False).stdout
        m = re.search(r"inet (\S+)/", out)
        if not m:
            return
        with self.lock:
            other = self.ip_owner.get(m.group(1))
            if other is not None and other != cid:
                self.duplicates.append(f"{m.group(1)}: {other} and {cid}")
            self.ip_owner[m.group(1)] = cid

    def delete(self, cid: str) -> bool:
        with self.lock:
            node, netns, pod = self.to_delete[cid]
        ok, why, _ = self.cni(node, "DEL", cid, netns, pod)
        with self.lock:
            self.dels["ok" if ok else why.split(":")[0]] += 1
            if not ok:
                self.dels_fail_msgs[why] += 1
                return False
            del self.to_delete[cid]
            for ip, owner in list(self.ip_owner.items()):
                if owner == cid:
                    del self.ip_owner[ip]
        sh("ip", "netns", "del", netns, check=False)
        subprocess.run(["etcdctl", f"--endpoints={self.c.etcd.endpoint}", "--command-timeout=2s", "del",
                        f"/tortie/pods/chaos/{pod}"], env=ETCDCTL_ENV, capture_output=True, timeout=10)
        return True

    # -- faults -------------------------------------------------------------------------

    def bird_pid(self, node: str) -> int | None:
        try:
            pid = int(open(os.path.join(self.c.workdir, node, "run", "bird", "bird.pid")).read().strip() or 0)
            os.kill(pid, 0)
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            return pid if stat not in ("Z", "X") else None
        except (OSError, ValueError, IndexError):
            return None

    def forward_rules(self, node: str, backend: str) -> int:
        text = sh(f"iptables-{backend}-save", "-t", "filter", ns=self.c.lab.node(node).ns, check=False).stdout
        return sum(1 for line in text.splitlines() if line.startswith("-A cali-FORWARD "))

    def inject(self) -> None:
        nodes = [n.name for n in self.c.lab.nodes]
        backend = self.c.status(nodes[0])["iptables_backend"]
        while not self.stop.wait(self.rng.uniform(3.0, 10.0)):
            kind, node = self.rng.choice(FAULTS), self.rng.choice(nodes)
            hold = self.rng.uniform(2.0, 8.0)
            self.faults[kind] += 1
            log(f"fault {kind} on {node if 'etcd' not in kind else 'etcd'}")
            t_end = time.monotonic()
            if kind == "agent_kill9":
                with self.lock:
                    self.caused.add(node)
                self.c.stop_agent(node, sig=signal.SIGKILL)
                time.sleep(self.rng.uniform(0.5, 3.0))
                self.c.start_agent(node, wait=False)
                with self.lock:
                    self.caused.discard(node)
                t_end = time.monotonic()
            elif kind == "agent_stop":
                p = self.c.agents[node]
                os.killpg(p.pid, signal.SIGSTOP)
                time.sleep(hold)
                os.killpg(p.pid, signal.SIGCONT)
                t_end = time.monotonic()
            elif kind == "bird_kill9":
                old = self.bird_pid(node)
                if old is None:
                    log(f"  bird not running on {node}; skipped")
                    continue
                os.kill(old, signal.SIGKILL)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 60 and self.bird_pid(node) in (None, old):
                    time.sleep(0.05)
                back = time.monotonic() - t0
                self.bird_restart.append(back)
                log(f"  bird back after {back:.2f}s")
                t_end = time.monotonic()
            elif kind == "etcd_kill9":
                os.killpg(self.c.etcd.proc.pid, signal.SIGKILL)
                self.c.etcd.proc.wait()
                self.c.etcd.proc = None
                time.sleep(self.rng.uniform(1.0, 5.0))
                self.c.etcd.start()
                t_end = time.monotonic()
            elif kind == "etcd_stop":
                os.killpg(self.c.etcd.proc.pid, signal.SIGSTOP)
                time.sleep(hold)
                os.killpg(self.c.etcd.proc.pid, signal.SIGCONT)
                t_end = time.monotonic()
            elif kind == "drift":
                if self.c.http(node, "/readyz")[0] != 200:
                    log(f"  {node} not ready; drift skipped")
                    continue
                sh(f"iptables-{backend}", "-t", "filter", "-F", "cali-FORWARD", ns=self.c.lab.node(node).ns)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 10 * self.args.resync and self.forward_rules(node, backend) == 0:
                    time.sleep(0.05)
                took = time.monotonic() - t0
                self.drift_repair.append(took)
                log(f"  cali-FORWARD restored after {took:.2f}s")
                t_end = time.monotonic()
            self.wait_ready(nodes, t_end, kind)

    def wait_ready(self, nodes: list[str], t_end: float, kind: str) -> None:
        pending = set(nodes)
        while pending and time.monotonic() - t_end < READY_BOUND:
            for n in list(pending):
                if self.c.http(n, "/readyz")[0] == 200:
                    pending.discard(n)
            if pending:
                time.sleep(0.25)
        took = time.monotonic() - t_end
        if pending:
            with self.lock:
                self.hangs.append(f"/readyz of {','.join(sorted(pending))} not 200 {READY_BOUND:.0f}s after {kind}")
            log(f"  HANG: {sorted(pending)} not ready {took:.0f}s after {kind}")
        else:
            self.recovery.append(took)

    def monitor(self) -> None:
        while not self.stop.wait(0.5):
            for n in [x.name for x in self.c.lab.nodes]:
                p = self.c.agents.get(n)
                with self.lock:
                    caused = n in self.caused
                if p is None or caused or p.poll() is None:
                    continue
                tail = self.c.agent_log(n)[-1500:]
                with self.lock:
                    self.exits.append(f"{n} exited with {p.returncode}: ...{tail[-600:]}")
                log(f"UNEXPLAINED agent exit on {n} ({p.returncode}); restarting it")
                self.c.start_agent(n, wait=False)

    # -- the end --------------------------------------------------------------------------

    def delete_everything(self) -> None:
        deadline = time.monotonic() + 300
        while self.to_delete and time.monotonic() < deadline:
            for cid in list(self.to_delete):
                self.delete(cid)
            if self.to_delete:
                time.sleep(1)

    def audit(self) -> dict:
        time.sleep(3 * self.args.resync)  # publisher, reaper and a full pass settle
        out = collections.Counter()
        for node in self.c.lab.nodes:
            ns = node.ns
            st = self.c.status(node.name)
            out["leaked addresses"] += len(st["ipam"]["allocation_list"])
            links = sh("ip", "-o", "link", "show", ns=ns).stdout
            out["veths"] += len(re.findall(r"^\d+: (cali|tortd)", links, re.M))
            routes = sh("ip", "route", "show", ns=ns).stdout
            out["routes"] += sum(1 for line in routes.splitlines() if " dev cali" in line)
            sets = sh("ipset", "list", ns=ns, check=False).stdout
            members = 0
            in_members = False
            for line in sets.splitlines():
                if line.startswith("Name:"):
                    in_members = False
                    # pod-address sets only (pools and hosts sets hold no pod)
                    cali = line.split()[1].startswith(("cali40wl-src", "cali40s:", "cali40n:"))
                elif line.startswith("Members:"):
                    in_members = cali
                elif in_members and line.strip():
                    members += 1
            out["ipset members"] += members
            cni_dir = os.path.join(self.c.workdir, node.name, "cni-state")
            out["CNI records"] += sum(len(f) for _, _, f in os.walk(cni_dir))
            intents = os.path.join(self.c.workdir, node.name, "state", "intents")
            out["ADD intents"] += len(os.listdir(intents)) if os.path.isdir(intents) else 0
        keys = subprocess.run(["etcdctl", f"--endpoints={self.c.etcd.endpoint}", "get", "--prefix", "--keys-only",
                               "/tortie/workloadendpoints/"], env=ETCDCTL_ENV, capture_output=True, text=True,
                              timeout=30).stdout.split()
        out["endpoint records"] = len(keys)
        out["undeleted attachments"] = len(self.to_delete)
        return dict(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("CHAOS_MINUTES", 10)))
    ap.add_argument("--seed", type=int, default=int(os.environ["CHAOS_SEED"]) if os.environ.get("CHAOS_SEED")
                    else None)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--resync", type=float, default=5.0, help="the agents' resync_interval")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("chaos.py needs root (network namespaces)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"chaos: seed {seed} ({args.minutes:g} min, {args.nodes} nodes, {args.workers} workers, "
          f"resync {args.resync:g}s); rerun with --seed {seed}", flush=True)
    rng = random.Random(seed)
    workdir = tempfile.mkdtemp(prefix="tortie-chaos-")
    with Etcd() as etcd, Lab(prefix=new_prefix("ch")) as lab:
        lab.build(args.nodes)
        c = LabCluster(lab, etcd, workdir, resync_interval=args.resync)
        c.apply_pool(POOL, mode="bgp")
        c.apply_namespace("chaos")
        c.start_agents()
        ch = Chaos(c, rng, args)
        threads = [threading.Thread(target=ch.worker, args=(w,), daemon=True) for w in range(args.workers)]
        threads += [threading.Thread(target=ch.inject, daemon=True), threading.Thread(target=ch.monitor, daemon=True)]
        t_start = time.monotonic()
        for t in threads:
            t.start()
        ch.stop.wait(args.minutes * 60)
        ch.stop.set()
        log("stopping churn and faults")
        for t in threads:
            t.join(REQUEST_BOUND * 3)
        # Everything back up before the final DEL (the injector ends with every fault undone).
        for n in lab.nodes:
            p = c.agents.get(n.name)
            if p is None or p.poll() is not None:
                c.start_agent(n.name, wait=False)
        for n in lab.nodes:
            c.wait_ready(n.name, timeout=120)
        log(f"deleting the {len(ch.to_delete)} attachments left")
        ch.delete_everything()
        leaks = ch.audit()
        elapsed = time.monotonic() - t_start
        for n in lab.nodes:
            c.stop_agent(n.name)
    figures = {
        "seed": seed, "minutes": round(elapsed / 60, 1), "nodes": args.nodes, "workers": args.workers,
        "resync_interval": args.resync,
        "adds": dict(ch.adds), "dels": dict(ch.dels),
        "add_failures": dict(ch.adds_fail_msgs.most_common(8)), "del_failures": dict(ch.dels_fail_msgs.most_common(8)),
        "faults": dict(ch.faults), "unexplained_agent_exits": len(ch.exits), "hangs": len(ch.hangs),
        "bird_restart_max_s": round(max(ch.bird_restart), 2) if ch.bird_restart else None,
        "bird_restart_median_s": round(statistics.median(ch.bird_restart), 2) if ch.bird_restart else None,
        "drift_repair_max_s": round(max(ch.drift_repair), 2) if ch.drift_repair else None,
        "drift_repair_median_s": round(statistics.median(ch.drift_repair), 2) if ch.drift_repair else None,
        "ready_after_fault_max_s": round(max(ch.recovery), 1) if ch.recovery else None,
        "duplicates": len(ch.duplicates), "leaks": leaks,
    }
    print("\n== chaos figures")
    print(f"seed {seed}, {figures['minutes']} min, {args.nodes} nodes, {args.workers} workers, resync {args.resync:g}s")
    print(f"ADDs: {sum(ch.adds.values())} ({', '.join(f'{k} {v}' for k, v in sorted(ch.adds.items()))})")
    for msg, n in ch.adds_fail_msgs.most_common(8):
        print(f"    {n:5d}  ADD {msg}")
    print(f"DELs: {sum(ch.dels.values())} ({', '.join(f'{k} {v}' for k, v in sorted(ch.dels.items()))})")
    for msg, n in ch.dels_fail_msgs.most_common(8):
        print(f"    {n:5d}  DEL {msg}")
    print(f"faults: {sum(ch.faults.values())} ({', '.join(f'{k} {v}' for k, v in sorted(ch.faults.items()))})")
    print(f"agent exits nobody caused: {len(ch.exits)}")
    for e in ch.exits[:5]:
        print("    " + e.replace("\n", "\n    "))
    print(f"hangs: {len(ch.hangs)}")
    for h in ch.hangs[:10]:
        print("    " + h)
    print(f"BIRD time to restart: max {figures['bird_restart_max_s']} s, median {figures['bird_restart_median_s']} s "
          f"({len(ch.bird_restart)} kills)")
    print(f"drift repair under churn: max {figures['drift_repair_max_s']} s, median {figures['drift_repair_median_s']} s "
          f"({len(ch.drift_repair)} flushes; resync interval {args.resync:g}s)")
    print(f"all agents ready after a fault ended: max {figures['ready_after_fault_max_s']} s")
    print(f"duplicates: {len(ch.duplicates)}")
    for d in ch.duplicates[:5]:
        print("    " + d)
    print("after the final DEL: " + ", ".join(f"{k} {v}" for k, v in leaks.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    missed = []
    if ch.exits:
        missed.append("unexplained agent exits")
    if ch.hangs:
        missed.append("hangs")
    if ch.bird_restart and max(ch.bird_restart) >= 5.0:
        missed.append("BIRD back in < 5 s")
    if ch.drift_repair and max(ch.drift_repair) > args.resync + 1.0:
        missed.append("drift repaired within one resync interval")
    if any(leaks.values()):
        missed.append("no leaks")
    if ch.duplicates:
        missed.append("no duplicates")
    print("targets: " + ("all met" if not missed else "MISSED: " + ", ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
