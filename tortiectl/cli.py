"""tortiectl: the command line for a tortie cluster in etcd mode.

    tortiectl [--etcd-endpoints HOST:PORT] [--prefix /tortie] apply -f FILE|-
    tortiectl get KIND [NAME] [-n NS | -A] [-o json|yaml|wide]
    tortiectl delete KIND NAME [-n NS]
    tortiectl delete -f FILE|-
    tortiectl trace NS/POD NS/POD|IP PORT/PROTO [-o json]
    tortiectl flows [--denied] [-n NS] [--follow] [-o json]

`apply` reads ordinary multi-document Kubernetes YAML (Pod, Namespace, Node,
NetworkPolicy, ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy, and
tortie's IPPool and BGPPeer), validates every document with
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

from felix_agent import model
from felix_agent.datastore.convert import ConvertError, from_k8s
from felix_agent.datastore import keys
from felix_agent.datastore.etcd import EtcdStore, EtcdUnavailable, record_key
from felix_agent.datastore.etcd_tls import EtcdTLS
from tortiectl import flows as flows_cmd
from tortiectl import status
from tortiectl import trace as trace_cmd
from tortiectl.documents import read_documents, resolve_kind, validate_documents
from tortiectl.errors import CliError
from tortiectl.render import render

DEFAULT_ENDPOINT = "127.0.0.1:2379"


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
    g.add_argument("kind", help="pods, namespaces, nodes, networkpolicies, clusternetworkpolicies, "
                                "adminnetworkpolicies, baselineadminnetworkpolicies, ippools, bgppeers, "
                                "workloadendpoints, blockaffinities (or kubectl's short names: cnp, anp, banp...)")
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
    status.add_commands(sub)
    flows_cmd.add_commands(sub)  # the flows one agent logged (its /flows)
    # `trace` reads the datastore alone and runs the agent's calc on it.
    trace_cmd.add_commands(sub)
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
    except KeyboardInterrupt:  # `flows --follow` ends this way
        return 130
    except EtcdUnavailable as e:
        hint = "" if "TLS:" in str(e) else "; set --etcd-endpoints or TORTIE_ETCD_ENDPOINTS"
        print(f"Error: cannot reach {e}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
