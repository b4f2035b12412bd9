"""`tortiectl trace <ns>/<pod> <ns>/<pod>|<ip> <port>/<proto> [-o json]`: would a new
connection be allowed, and which tier, policy and rule decides, from the datastore alone
(no agent, no node access): the records are read from etcd into the calc's Cluster and
felix_agent.calc.trace answers with the agent's own chains."""
from __future__ import annotations

import ipaddress
import json

from felix_agent.calc.cluster import Cluster
from felix_agent.calc.trace import Party, Trace, TraceError, trace
from felix_agent.datastore.etcd import EtcdStore
from felix_agent.model import KINDS, Update
from tortiectl.errors import CliError


async def load_cluster(store: EtcdStore) -> Cluster:
    """Every record of the datastore, as the agents' calc sees them."""
    c = Cluster()
    for kind in KINDS:
        for rec in sorted(await store.get_all(kind), key=lambda r: r.key):
            c.apply(Update(kind, rec.key, rec))
    return c


def resolve(cluster: Cluster, text: str, role: str) -> Party:
    """<ns>/<pod> -> its endpoint; an IP -> the pod that has it, or the address itself."""
    eps = cluster.endpoint_map()
    if "/" in text and not _is_ip(text.split("/")[0]):
        ns, _, name = text.partition("/")
        ep = eps.get((ns, name))
        if ep is None:
            raise CliError(f"{role} pod {text} not found (or host-network: no policy applies)")
        return ep
    if not _is_ip(text):
        raise CliError(f"{role} {text!r} is neither <namespace>/<pod> nor an IP address")
    text = str(ipaddress.ip_address(text))  # an IPv6 address in its one canonical spelling
    owners = [ep for ep in eps.values() if text in ep.ips]
    return owners[0] if len(owners) == 1 else text


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def parse_port(text: str) -> tuple[int, str]:
    port, _, proto = text.partition("/")
    if not port.isdigit():
        raise CliError(f"port {text!r} must be <number>/<protocol>, e.g. 80/tcp")
    return int(port), proto or "tcp"


def render(t: Trace) -> str:
    over = " over IPv6" if t.family == 6 else ""  # IPv4 unsaid: the usual case, the output as before
    lines = [f"{t.src} -> {t.dst} {t.port}/{t.protocol}{over}: {'ALLOWED' if t.allowed else 'DENIED'}",
             f"  {t.reason}"]
    for d in t.directions:
        lines.append(f"  {d.direction} of {d.pod} (node {d.node}): {'allow' if d.allowed else 'deny'}"
                     f" by {d.decided_by}")
        for s in d.steps:
            named = f" ({s.rule_name})" if s.rule_name else ""
            lines.append(f"    {s.where} {d.direction} rule {s.rule}{named}: {s.action}")
    return "\n".join(lines)


async def cmd_trace(store: EtcdStore, args) -> int:
    port, proto = parse_port(args.port)
    cluster = await load_cluster(store)
    src, dst = resolve(cluster, args.src, "source"), resolve(cluster, args.dst, "destination")
    try:
        t = trace(cluster, src, dst, port, proto, args.family)
    except TraceError as e:
        raise CliError(str(e)) from None
    print(json.dumps(t.as_dict(), indent=2) if args.output == "json" else render(t))
    return 0


def add_commands(sub) -> None:
    t = sub.add_parser("trace", help="would a connection be allowed, and which tier/policy/rule decides")
    t.add_argument("src", help="<namespace>/<pod>, or an IP address")
    t.add_argument("dst", help="<namespace>/<pod>, or an IP address")
    t.add_argument("port", help="<port>/<protocol>, e.g. 80/tcp")
    t.add_argument("-o", "--output", choices=("json",), help="json for scripts")
    t.add_argument("--family", type=int, choices=(4, 6),
                   help="IP family between two pods (default: an address's, else 4)")
    t.set_defaults(func=cmd_trace)
