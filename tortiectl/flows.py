"""`tortiectl flows [--denied] [-n NS] [--follow] [-o json]`: the flows one node's agent
logged (its /flows document, agent/flows.py), each with its verdict and the policy that
decided.  The agent must run with flow_logs on; otherwise this says so."""
from __future__ import annotations

import asyncio
import json
import urllib.parse
from datetime import datetime

from tortiectl.errors import CliError
from tortiectl.render import table
from tortiectl.status import DEFAULT_AGENT, AgentUnreachable, fetch_status

FOLLOW_INTERVAL = 1.0


def decided_by(f: dict) -> str:
    """"Admin: ClusterNetworkPolicy/x rule 1 (block-y)", "NetworkPolicy x/a (no rule allowed)"..."""
    tier, policy, rule = f.get("tier", ""), f.get("policy", ""), f.get("rule", -1)
    where = policy if tier in ("NetworkPolicy", "default", "") else f"{tier}: {policy}"
    if rule >= 0:
        where += f" rule {rule}" + (f" ({f['rule_name']})" if f.get("rule_name") else "")
    elif tier == "NetworkPolicy" and f.get("verdict") == "deny":
        where += " (no rule allowed)"
    return where


def _party(ip: str, name: str) -> str:
    return f"{name} ({ip})" if name else ip


def render(flows: list[dict]) -> str:
    rows = [[datetime.fromtimestamp(f["last_seen"]).strftime("%H:%M:%S"), _party(f["src"], f["src_name"]),
             _party(f["dst"], f["dst_name"]), f"{f['dport']}/{f['proto']}", f["verdict"].upper(),
             f.get("direction", ""), decided_by(f), str(f["packets"])] for f in flows]
    return table(rows, ["LAST SEEN", "SOURCE", "DESTINATION", "PORT", "VERDICT", "DIRECTION", "DECIDED BY",
                        "PACKETS"])


def fetch_flows(agent: str, denied: bool, namespace: str, since: int) -> dict:
    q = urllib.parse.urlencode({"denied": "1" if denied else "", "namespace": namespace or "", "since": since})
    try:
        doc = fetch_status(agent, "/flows?" + q)
    except AgentUnreachable as e:
        raise CliError(str(e)) from None
    state = (doc.get("flow_logs") or {}).get("state")
    if state != "on":
        why = (doc.get("flow_logs") or {}).get("reason", "")
        raise CliError(f"flow logs are {state} on this node" + (f": {why}" if why else "")
                       + ("" if state == "unavailable" else " (set flow_logs in the agent's config)"))
    return doc


async def cmd_flows(_store, args) -> int:
    doc = fetch_flows(args.agent, args.denied, args.namespace, 0)
    flows = doc["flows"]
    if args.output == "json" and not args.follow:
        print(json.dumps(flows, indent=2))
        return 0
    print("\n".join(json.dumps(f) for f in flows) if args.output == "json" else render(flows))
    seq = doc["seq"]
    while args.follow:  # the flows updated since the last look, every second, until ^C
        await asyncio.sleep(FOLLOW_INTERVAL)
        doc = fetch_flows(args.agent, args.denied, args.namespace, seq)
        seq = doc["seq"]
        if doc["flows"]:
            print("\n".join(json.dumps(f) for f in doc["flows"]) if args.output == "json"
                  else render(doc["flows"]).split("\n", 1)[1], flush=True)
    return 0


def add_commands(sub) -> None:
    f = sub.add_parser("flows", help="flows this node's agent logged: verdict and the policy that decided "
                                     "(agent config flow_logs)")
    f.add_argument("--denied", action="store_true", help="only denied flows")
    f.add_argument("-n", "--namespace", default="", help="only flows from or to pods of this namespace")
    f.add_argument("--follow", "-f", action="store_true", help="keep printing flows as they are seen (^C stops)")
    f.add_argument("--agent", default=DEFAULT_AGENT,
                   help="the agent's HTTP address (env TORTIE_AGENT_URL; default %(default)s)")
    f.add_argument("-o", "--output", choices=("json",), help="json (with --follow: one flow per line)")
    f.set_defaults(func=cmd_flows)
