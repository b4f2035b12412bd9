"""tortiectl: the command line for a tortie cluster in etcd mode.

    tortiectl [--etcd-endpoints HOST:PORT] [--prefix /tortie] apply -f FILE|-
    tortiectl get KIND [NAME] [-n NS | -A] [-o json|yaml|wide]
    tortiectl delete KIND NAME [-n NS]
    tortiectl delete -f FILE|-

`apply` reads ordinary multi-document Kubernetes YAML (Pod, Namespace, Node,
NetworkPolicy, and tortie's IPPool and BGPPeer), validates every document with
convert.from_k8s first, and writes them all in one etcd transaction: one bad document
means an error naming it and its field, and nothing written.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Iterable

import yaml

from felix_agent import model
from felix_agent.datastore.convert import ConvertError, from_k8s, to_k8s
from felix_agent.datastore import keys
from felix_agent.datastore.etcd import EtcdStore, EtcdUnavailable, record_key
from felix_agent.datastore.etcd_tls import EtcdTLS

DEFAULT_ENDPOINT = "127.0.0.1:2379"
APPLICABLE = ("Pod", "Namespace", "Node", "NetworkPolicy", "IPPool", "BGPPeer")

# Every spelling kubectl users type, to the kind.
ALIASES = {}
for _kind, _names in {
    "Pod": ("pod", "pods", "po"),
    "Namespace": ("namespace", "namespaces", "ns"),
    "Node": ("node", "nodes", "no"),
    "NetworkPolicy": ("networkpolicy", "networkpolicies", "netpol"),
    "IPPool": ("ippool", "ippools", "pool", "pools"),
    "BGPPeer": ("bgppeer", "bgppeers", "peer", "peers"),
    "WorkloadEndpoint": ("workloadendpoint", "workloadendpoints", "wep", "weps"),
    "BlockAffinity": ("blockaffinity", "blockaffinities", "block", "blocks"),
}.items():
    for _n in _names:
        ALIASES[_n] = _kind


class CliError(Exception):
    """A user-facing error: printed as `Error: ...`, exit status 1."""


def resolve_kind(text: str) -> str:
    kind = ALIASES.get(text.lower())
    if kind is None:
        raise CliError(f"unknown resource type {text!r} (one of: {', '.join(sorted(set(ALIASES.values())))})")
    return kind


# --- reading manifests ------------------------------------------------------------------

def _describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return "not a mapping"
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name", "<unnamed>")
    ns = meta.get("namespace")
    return f"{obj.get('kind', '<no kind>')} {ns + '/' if ns else ''}{name}"


def read_documents(path: str) -> list[tuple[str, dict]]:
    """(label, object) for every non-empty document; kind: List is flattened. The label
    ("FILE document N (Kind ns/name)") is what errors name."""
    try:
        text = sys.stdin.read() if path == "-" else open(path).read()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    src = "stdin" if path == "-" else path
    out = []
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise CliError(f"{src}: invalid YAML: {e}") from None
    for i, doc in enumerate(docs, 1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise CliError(f"{src} document {i}: not a Kubernetes object (got {type(doc).__name__})")
        items = doc.get("items") if doc.get("kind") == "List" else [doc]
        for j, obj in enumerate(items or [], 1):
            label = f"{src} document {i}" + (f" item {j}" if doc.get("kind") == "List" else "")
            out.append((f"{label} ({_describe(obj)})", obj))
    if not out:
        raise CliError(f"{src}: no objects found")
    return out


def validate_documents(docs: list[tuple[str, dict]], kinds: Iterable[str] = APPLICABLE) -> list[model.Record]:
    records = []
    allowed = tuple(kinds)
    for label, obj in docs:
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if kind not in allowed:
            raise CliError(f"{label}: kind {kind!r} cannot be applied (one of: {', '.join(allowed)})")
        try:
            records.append(from_k8s(obj))
        except ConvertError as e:
            raise CliError(f"{label}: {e}") from None
    seen: dict[tuple[str, str], str] = {}
    for (label, _), rec in zip(docs, records):
        rid = (model.KIND_OF[type(rec)], rec.key)
        if rid in seen:
            raise CliError(f"{label}: the same object as {seen[rid]}")
        seen[rid] = label
    return records


# --- output -------------------------------------------------------------------------------

def _labels(labels: model.Labels) -> str:
    return ",".join(f"{k}={v}" for k, v in labels) or "<none>"


def _selector(sel: model.LabelSelector) -> str:
    return "<all>" if sel.is_empty else sel.canonical()


def _rules(rules: tuple[model.PolicyRule, ...]) -> str:
    return str(len(rules))


# kind -> (headers, row function, extra wide headers, wide row function)
Columns = tuple[list[str], Callable[[Any], list[str]], list[str], Callable[[Any], list[str]]]
COLUMNS: dict[str, Columns] = {
    "Pod": (["NAMESPACE", "NAME", "NODE", "IPS"],
            lambda r: [r.namespace, r.name, r.node or "<none>", ",".join(r.ips) or "<none>"],
            ["HOSTNET", "PORTS", "LABELS"],
            lambda r: [str(r.host_network).lower(),
                       ",".join(f"{p.name}:{p.port}/{p.protocol}" for p in r.ports) or "<none>",
                       _labels(r.labels)]),
    "Namespace": (["NAME", "LABELS"], lambda r: [r.name, _labels(r.labels)], [], lambda r: []),
    "Node": (["NAME", "IP", "AS", "POD-CIDRS"],
             lambda r: [r.name, r.ip or "<none>", str(r.as_number or "default"),
                        ",".join(r.pod_cidrs) or "<none>"],
             ["IP6", "VXLAN", "IPIP", "RR-CLUSTER", "LABELS"],
             lambda r: [r.ip6 or "<none>",
                        f"{r.vxlan_tunnel_addr}/{r.vxlan_tunnel_mac}" if r.vxlan_tunnel_addr else "<none>",
                        r.ipip_tunnel_addr or "<none>", r.route_reflector_cluster_id or "<none>",
                        _labels(r.labels)]),
    "NetworkPolicy": (["NAMESPACE", "NAME", "POD-SELECTOR", "TYPES"],
                      lambda r: [r.namespace, r.name, _selector(r.pod_selector), ",".join(r.policy_types)],
                      ["INGRESS-RULES", "EGRESS-RULES"],
                      lambda r: [_rules(r.ingress), _rules(r.egress)]),
    "IPPool": (["NAME", "CIDR", "BLOCK", "MODE", "NAT", "DISABLED"],
               lambda r: [r.name, r.cidr, f"/{r.block_size}", r.mode, str(r.nat_outgoing).lower(),
                          str(r.disabled).lower()],
               ["CROSS-SUBNET"], lambda r: [str(r.cross_subnet).lower()]),
    "BGPPeer": (["NAME", "PEER-IP", "AS", "NODE"],
                lambda r: [r.name, r.peer_ip, str(r.as_number), r.node or "<all>"], [], lambda r: []),
    "WorkloadEndpoint": (["NODE", "NAMESPACE", "POD", "IFACE", "IPS"],
                         lambda r: [r.node, r.namespace, r.pod, r.iface, ",".join(r.ips)],
                         ["MAC", "CONTAINER"], lambda r: [r.mac, r.container_id[:12]]),
    "BlockAffinity": (["CIDR", "NODE", "POOL"], lambda r: [r.cidr, r.node, r.pool or "<none>"],
                      [], lambda r: []),
}


def render_table(kind: str, records: list[model.Record], wide: bool = False) -> str:
    headers, row, wheaders, wrow = COLUMNS[kind]
    rows = [headers + (wheaders if wide else [])]
    for r in records:
        rows.append(row(r) + (wrow(r) if wide else []))
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in rows)


def render(kind: str, records: list[model.Record], output: str, single: bool) -> str:
    if output in ("json", "yaml"):
        objs = [to_k8s(r) for r in records]
        doc: Any = objs[0] if single else {"apiVersion": "v1", "kind": "List", "items": objs}
        if output == "json":
            return json.dumps(doc, indent=2)
        return yaml.safe_dump(doc, sort_keys=False).rstrip()
    if not records:
        return f"No {keys.PLURAL[kind]} found."
    return render_table(kind, records, wide=(output == "wide"))


# --- commands -----------------------------------------------------------------------------

def _noun(rec: model.Record) -> str:
    kind = model.KIND_OF[type(rec)]
    return f"{kind.lower()}/{rec.key}"


async def cmd_apply(store: EtcdStore, args) -> int:
    records = validate_documents(read_documents(args.filename))
    before = {}
    for r in records:
        before[record_key(store.prefix, r)] = await store.get_value(record_key(store.prefix, r))
    await store.put_records(records)
    for r in records:
        old = before[record_key(store.prefix, r)]
        if old is None:
            verb = "created"
        else:
            try:
                verb = "unchanged" if from_k8s(json.loads(old)) == r else "configured"
            except (ValueError, ConvertError):
                verb = "configured"
        print(f"{_noun(r)} {verb}")
    return 0


def _name_args(kind: str, name: str, namespace: str | None) -> tuple[str, str]:
    if kind in keys.NAMESPACED:
        if "/" in name and not namespace:
            namespace, name = name.split("/", 1)
        return name, namespace or "default"
    return name, ""


async def _with_wired_ips(store: EtcdStore, pods: list[model.Pod]) -> list[model.Pod]:
    """Pods as tables show them: in etcd mode no kubelet writes status.podIPs, so a Pod
    applied with tortiectl has none; its addresses are those its CNI ADDs wired, which the
    agents publish as WorkloadEndpoints. Display only: the stored Pod stays as applied."""
    if all(p.ips for p in pods):
        return pods
    wired: dict[tuple[str, str], list[str]] = {}
    for wep in sorted(await store.get_all("WorkloadEndpoint"), key=lambda w: w.key):
        wired.setdefault((wep.namespace, wep.pod), []).extend(wep.ips)
    return [p if p.ips or (p.namespace, p.name) not in wired
            else dataclasses.replace(p, ips=tuple(wired[(p.namespace, p.name)])) for p in pods]


async def cmd_get(store: EtcdStore, args) -> int:
    kind = resolve_kind(args.kind)
    if args.all_namespaces:  # kubectl's rules: -A wins over -n, and takes no NAME
        if args.name:
            raise CliError("a resource cannot be retrieved by name across all namespaces")
        args.namespace = None
    if args.name:
        name, ns = _name_args(kind, args.name, args.namespace)
        rec = await store.get(kind, name, ns)
        if rec is None:
            raise CliError(f"{kind.lower()} {ns + '/' if ns else ''}{name} not found")
        records = [rec]
    else:
        records = await store.get_all(kind)
        if args.namespace and kind in keys.NAMESPACED:
            records = [r for r in records if r.namespace == args.namespace]
        records.sort(key=lambda r: r.key)
    if kind == "Pod" and (args.output or "table") in ("table", "wide"):
        records = await _with_wired_ips(store, records)
    print(render(kind, records, args.output or "table", single=bool(args.name)))
    return 0


async def cmd_delete(store: EtcdStore, args) -> int:
    if args.filename:
        if args.kind or args.name:
            raise CliError("delete takes either -f FILE or KIND NAME, not both")
        targets = []
        for label, obj in read_documents(args.filename):
            try:
                rec = from_k8s(obj)
            except ConvertError as e:
                raise CliError(f"{label}: {e}") from None
            kind = model.KIND_OF[type(rec)]
            name = rec.name if kind in keys.NAMESPACED else rec.key
            targets.append((kind, name, getattr(rec, "namespace", "") if kind in keys.NAMESPACED else ""))
    else:
        if not (args.kind and args.name):
            raise CliError("delete needs KIND NAME or -f FILE")
        kind = resolve_kind(args.kind)
        name, ns = _name_args(kind, args.name, args.namespace)
        targets = [(kind, name, ns)]
    missing = 0
    for kind, name, ns in targets:
        shown = f"{kind.lower()}/{ns + '/' if ns else ''}{name}"
        if await store.delete(kind, name, ns):
            print(f"{shown} deleted")
        else:
            print(f"Error: {shown} not found", file=sys.stderr)
            missing += 1
    return 1 if missing else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tortiectl", description="Manage a tortie cluster's datastore (etcd mode).")
    p.add_argument("--etcd-endpoints", default=os.environ.get("TORTIE_ETCD_ENDPOINTS", DEFAULT_ENDPOINT),
                   help="etcd client URL host:port (env TORTIE_ETCD_ENDPOINTS; default %(default)s)")
    p.add_argument("--prefix", default=os.environ.get("TORTIE_ETCD_PREFIX", keys.DEFAULT_PREFIX),
                   help="key prefix of the cluster's objects (env TORTIE_ETCD_PREFIX; default %(default)s)")
    for name, what in (("ca-file", "CA that signed etcd's server certificate (with an https:// endpoint)"),
                       ("cert-file", "client certificate for etcd's client-cert auth"),
                       ("key-file", "key of --etcd-cert-file")):
        env = "TORTIE_ETCD_" + name.upper().replace("-", "_")
        p.add_argument(f"--etcd-{name}", default=os.environ.get(env, ""), help=f"{what} (env {env})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("apply", help="create or update objects from Kubernetes YAML")
    a.add_argument("-f", "--filename", required=True, help="a YAML file, or - for stdin")
    a.set_defaults(func=cmd_apply)

    g = sub.add_parser("get", help="list objects of a kind, or show one")
    g.add_argument("kind", help="pods, namespaces, nodes, networkpolicies, ippools, bgppeers, "
                                "workloadendpoints, blockaffinities (or kubectl's short names)")
    g.add_argument("name", nargs="?")
    g.add_argument("-n", "--namespace", help="only this namespace (default for a NAME: default)")
    g.add_argument("-A", "--all-namespaces", action="store_true",
                   help="every namespace, as kubectl; also what a list without -n shows")
    g.add_argument("-o", "--output", choices=("json", "yaml", "wide"))
    g.set_defaults(func=cmd_get)

    d = sub.add_parser("delete", help="delete objects by KIND NAME or from a file")
    d.add_argument("kind", nargs="?")
    d.add_argument("name", nargs="?")
    d.add_argument("-n", "--namespace")
    d.add_argument("-f", "--filename")
    d.set_defaults(func=cmd_delete)

    # Views of one node's agent (status, node status, ipam show) read its /status.
    from tortiectl.status import add_commands
    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tls = None
        if args.etcd_endpoints.strip().startswith("https://"):
            if not args.etcd_ca_file:
                raise ValueError("an https:// etcd endpoint needs --etcd-ca-file (or TORTIE_ETCD_CA_FILE)")
            tls = EtcdTLS(args.etcd_ca_file, args.etcd_cert_file, args.etcd_key_file)
            tls.check()  # a TLSConfigError is a ValueError naming the file
        elif args.etcd_ca_file or args.etcd_cert_file or args.etcd_key_file:
            raise ValueError(f"etcd endpoint {args.etcd_endpoints!r} is plaintext but TLS files are given; "
                             "write it as https://host:port")
        store = EtcdStore.from_endpoint(args.etcd_endpoints, args.prefix, tls=tls)
    except ValueError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1

    async def go() -> int:
        try:
            return await args.func(store, args)
        finally:
            await store.close()
    try:
        return asyncio.run(go())
    except CliError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except EtcdUnavailable as e:
        hint = "" if "TLS:" in str(e) else "; set --etcd-endpoints or TORTIE_ETCD_ENDPOINTS"
        print(f"Error: cannot reach {e}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
