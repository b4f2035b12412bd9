"""tortiectl's views of one node's agent: `status`, `node status` (BGP) and `ipam show`.

They read the agent's /status document over HTTP (the agent's http_host:http_port, by
default 127.0.0.1:9099 inside the node), so they work in both datastore modes."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from tortiectl.errors import CliError
from tortiectl.render import table

DEFAULT_AGENT = os.environ.get("TORTIE_AGENT_URL", "http://127.0.0.1:9099")


class AgentUnreachable(Exception):
    pass


def fetch_status(url: str, path: str = "/status") -> dict:
    """The agent's JSON document at `path` (/status, /flows?...)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=5) as r:
            return json.load(r)
    except (urllib.error.URLError, OSError) as e:
        raise AgentUnreachable(f"cannot reach the agent at {url}: {getattr(e, 'reason', e)}") from None


def render_bgp(st: dict) -> str:
    peers = st.get("bgp_peers") or []
    if not peers:
        return "BGP: no sessions (no bgp/ipip pool, or BIRD not running)"
    rows = [[p.get("name", ""), p.get("state", ""), p.get("since", ""), p.get("info", "")] for p in peers]
    return table(rows, ["PEER", "STATE", "SINCE", "INFO"])


def render_status(st: dict) -> str:
    ago = f"{time.time() - st['last_apply']:.1f}s ago" if st.get("last_apply") else "never"
    lines = [
        f"Node:             {st['node']} ({st.get('node_ip', '')})",
        f"Datastore:        {st['datastore']}, {'in sync' if st['in_sync'] else 'NOT in sync'}"
        + (f" ({st['sync_reason']})" if st.get("sync_reason") else ""),
        f"Ready:            {'yes' if st.get('ready') else 'no'}",
        f"Routing modes:    {', '.join(st.get('routing_modes') or []) or '-'}",
        f"iptables backend: {st.get('iptables_backend', '-')}",
        f"Last apply:       {ago} (took {st.get('last_apply_seconds', 0) * 1000:.1f} ms, {st.get('applies', 0)} passes)",
    ]
    if st.get("last_error"):
        lines.append(f"Last error:       {st['last_error']}")
    for note in st.get("datastore_notes") or ():
        lines.append(f"Datastore note:   {note}")
    if st.get("bad_records"):
        lines.append(f"Bad records:      {len(st['bad_records'])} in the datastore, skipped "
                     f"(first: {st['bad_records'][0]['key']})")
    fl = st.get("flow_logs") or {"state": "off"}
    if fl.get("state") == "on":
        lines.append(f"Flow logs:        on (NFLOG group {fl.get('nflog_group')}, {fl.get('flows', 0)}/"
                     f"{fl.get('max_flows', 0)} flows, {fl.get('evicted', 0)} evicted)")
    else:
        lines.append(f"Flow logs:        {fl.get('state')}" + (f" ({fl['reason']})" if fl.get("reason") else ""))
    eps = st.get("endpoints") or []
    lines += ["", f"Endpoints on this node: {len(eps)}"]
    if eps:
        lines.append(table([[f"{e['namespace']}/{e['pod']}", e["iface"], ",".join(e["ips"])] for e in eps],
                           ["POD", "INTERFACE", "IPS"]))
    lines += ["", render_bgp(st)]
    return "\n".join(lines)


def render_ipam(st: dict) -> str:
    ipam = st.get("ipam") or {}
    blocks = ipam.get("blocks") or []
    lines = [table([[b["cidr"], b.get("pool", ""), f"{b['used']}/{b['capacity']}"] for b in blocks],
                   ["BLOCK", "POOL", "USED"]) if blocks else "no blocks"]
    allocs = ipam.get("allocation_list") or []
    lines += ["", f"Allocations: {ipam.get('allocations', 0)}, leaks: {ipam.get('leaks', 0)}"]
    if allocs:
        lines.append(table([[a["ip"], a["container_id"][:16], f"{a['namespace']}/{a['pod']}",
                             "LEAK" if a.get("leak") else ""] for a in allocs],
                           ["IP", "CONTAINER", "POD", ""]))
    return "\n".join(lines)


def add_commands(sub) -> None:
    def common(p):
        p.add_argument("--agent", default=DEFAULT_AGENT,
                       help="the agent's HTTP address (env TORTIE_AGENT_URL; default %(default)s)")
        p.add_argument("-o", "--output", choices=("json",), help="json for scripts")

    s = sub.add_parser("status", help="this node's agent: datastore sync, endpoints, BGP, dataplane")
    common(s)
    s.set_defaults(func=_cmd(render_status, lambda st: st))
    n = sub.add_parser("node", help="node views: `node status` shows this node's BGP peers")
    nsub = n.add_subparsers(dest="node_command", required=True, metavar="SUBCOMMAND")
    ns = nsub.add_parser("status", help="BGP peers of this node and their state (from birdc)")
    common(ns)
    ns.set_defaults(func=_cmd(render_bgp, lambda st: st.get("bgp_peers") or []))
    i = sub.add_parser("ipam", help="IPAM views: `ipam show` lists blocks, allocations and leaks")
    isub = i.add_subparsers(dest="ipam_command", required=True, metavar="SUBCOMMAND")
    ish = isub.add_parser("show", help="this node's blocks, allocations and leaked addresses")
    common(ish)
    ish.set_defaults(func=_cmd(render_ipam, lambda st: st.get("ipam") or {}))


def _cmd(render, select):
    async def run(_store, args) -> int:
        try:
            st = fetch_status(args.agent)
        except AgentUnreachable as e:
            raise CliError(str(e)) from None
        print(json.dumps(select(st), indent=2) if args.output == "json" else render(st))
        return 0
    return run
