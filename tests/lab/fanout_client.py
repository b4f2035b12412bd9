"""An agent's datastore side alone, as its own process: FanoutSyncer connected to a
tortie-fanout (or, with --direct, KubernetesSyncer watching the API itself), every event
printed as one JSON line (tests kill it and start it again).

    python -m tests.lab.fanout_client HOST:PORT NODE
    python -m tests.lab.fanout_client --direct KUBECONFIG NODE

    {"update": [kind, key, <the record as to_k8s gives it> | null]}
    {"status": [in_sync, reason]}
"""
from __future__ import annotations

import asyncio
import json
import sys

from felix_agent.datastore.base import Backoff
from felix_agent.datastore.convert import to_k8s
from felix_agent.datastore.fanout.client import FanoutSyncer
from felix_agent.model import Event, Update


def line(ev: Event) -> str:
    if isinstance(ev, Update):
        return json.dumps({"update": [ev.kind, ev.key, None if ev.value is None else to_k8s(ev.value)]})
    return json.dumps({"status": [ev.in_sync, ev.reason]})


def main() -> None:
    if sys.argv[1] == "--direct":
        from felix_agent.datastore.kubernetes import KubernetesSyncer
        syncer = KubernetesSyncer(kubeconfig=sys.argv[2], backoff=Backoff(0.05, 0.5))
    else:
        host, _, port = sys.argv[1].rpartition(":")
        syncer = FanoutSyncer([(host, int(port))], sys.argv[2], backoff=Backoff(0.05, 0.5))
    asyncio.run(syncer.run(lambda ev: print(line(ev), flush=True)))


if __name__ == "__main__":
    main()
