"""The lab's cluster DNS: a stand-in for CoreDNS, which this machine cannot have (it is not
in Debian and not in the Kubernetes tree the lab builds from).

It answers what the upstream Services specs ask a cluster DNS for and nothing more:
`<service>.<namespace>.svc.<domain>` A -> the Service's ClusterIP, read from the API server
at query time (a Service created a moment ago resolves at once).  Every other name is
NXDOMAIN, so a pod's search-list expansions fall through as with CoreDNS; AAAA of a known
Service is an empty NOERROR (no IPv6 here).  One runs in each node namespace on the node's
address, the kubelets' clusterDNS: a pod reaches its own node without any route.

    python -m tests.kube.cluster_dns --kubeconfig K --listen 10.99.0.11 [--domain cluster.local]
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Callable

TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
RCODE_OK, RCODE_FORMERR, RCODE_NXDOMAIN = 0, 1, 3
TTL = 5  # short: the specs create and delete Services all the time


class BadQuery(ValueError):
    pass


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    qclass: int
    question: bytes  # the question section as sent, echoed in the answer


def parse_query(data: bytes) -> Query:
    """The first question of a DNS query (RFC 1035 4.1); BadQuery for anything malformed."""
    if len(data) < 12:
        raise BadQuery("shorter than a DNS header")
    qid, flags, qdcount = struct.unpack("!HHH", data[:6])
    if flags & 0x8000 or qdcount < 1:
        raise BadQuery("not a query with a question")
    labels, pos = [], 12
    while True:
        if pos >= len(data):
            raise BadQuery("name runs past the end")
        n = data[pos]
        if n & 0xC0:
            raise BadQuery("compressed name in a question")
        pos += 1
        if n == 0:
            break
        labels.append(data[pos:pos + n].decode("ascii", "replace").lower())
        pos += n
    if pos + 4 > len(data):
        raise BadQuery("question has no type and class")
    qtype, qclass = struct.unpack("!HH", data[pos:pos + 4])
    return Query(qid, flags, ".".join(labels), qtype, qclass, data[12:pos + 4])


def answer(q: Query, rcode: int, addresses: list[str] = ()) -> bytes:
    """A response to q: its question, then one A record per address (name by pointer)."""
    flags = 0x8000 | 0x0400 | 0x0080 | (q.flags & 0x0100) | rcode  # QR, AA, RA, RD copied
    out = struct.pack("!HHHHHH", q.id, flags, 1, len(addresses), 0, 0) + q.question
    for a in addresses:
        out += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL, 4) + ipaddress.IPv4Address(a).packed
    return out


def service_name(name: str, domain: str) -> tuple[str, str] | None:
    """(namespace, service) of `<svc>.<ns>.svc.<domain>`, else None."""
    suffix = f".svc.{domain}"
    if not name.endswith(suffix):
        return None
    parts = name[: -len(suffix)].split(".")
    return (parts[1], parts[0]) if len(parts) == 2 else None


def resolve(q: Query, domain: str, cluster_ip: Callable[[str, str], str | None]) -> bytes:
    """The response to q; cluster_ip(namespace, service) is the Service's ClusterIP or None."""
    svc = service_name(q.name, domain) if q.qclass == CLASS_IN else None
    ip = cluster_ip(*svc) if svc else None
    if not ip or ip == "None":  # unknown, headless or ExternalName (no ClusterIP to give)
        return answer(q, RCODE_NXDOMAIN)
    return answer(q, RCODE_OK, [ip] if q.qtype == TYPE_A else [])


def api_lookup(kubeconfig: str) -> Callable[[str, str], str | None]:
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException
    api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))

    def cluster_ip(namespace: str, name: str) -> str | None:
        try:
            return api.read_namespaced_service(name, namespace, _request_timeout=2).spec.cluster_ip
        except ApiException as e:
            if e.status == 404:
                return None
            raise
    return cluster_ip


def serve(listen: str, domain: str, cluster_ip: Callable[[str, str], str | None], port: int = 53) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((listen, port))
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            q = parse_query(data)
        except BadQuery:
            if len(data) >= 2:  # FORMERR with the id, as a server does
                sock.sendto(data[:2] + struct.pack("!HHHHH", 0x8000 | RCODE_FORMERR, 0, 0, 0, 0), peer)
            continue
        try:
            reply = resolve(q, domain, cluster_ip)
        except Exception as e:  # noqa: BLE001 - the API server away: SERVFAIL, keep serving
            print(f"cluster-dns: {q.name}: {e}", flush=True)
            reply = answer(q, 2)
        sock.sendto(reply, peer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--domain", default="cluster.local")
    a = ap.parse_args()
    serve(a.listen, a.domain, api_lookup(a.kubeconfig))


if __name__ == "__main__":
    main()
