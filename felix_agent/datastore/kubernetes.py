"""The Kubernetes API datastore: list + watch Pods, Namespaces, Nodes, NetworkPolicies and
the network-policy-api kinds (ClusterNetworkPolicy, AdminNetworkPolicy,
BaselineAdminNetworkPolicy) where their CRDs are installed.

One thread per resource runs the blocking list/watch cycle with the official `kubernetes`
client (config loading, auth, REST calls) and hands raw JSON to the asyncio loop, where
the conversion and the emitted-state bookkeeping (base.EmittedState) happen, so all
model state stays on one thread.

Per resource:
  list (paginated with limit/continue) -> emit the difference -> watch from the list's
  resourceVersion with bookmarks -> on a clean end of the stream (server timeout) watch
  again from the last resourceVersion seen.
  410 Gone (a list, an expired continue token, or an ERROR event in the watch stream)
  -> relist at once; the diff emits deletions for whatever vanished meanwhile.
  Connection errors, 5xx, 401/403 -> SyncStatus(False), backoff, relist.

A CRD that is not installed (404 on its list) counts as an empty list, so the agent syncs
and runs; it is logged once, shown in `notes` (tortiectl status), and looked for again
every ABSENT_RECHECK_SECONDS.

Node objects also give the IPAM blocks of the node: one BlockAffinity per
spec.podCIDRs entry (pool ""), so the calc's routes work the same as with etcd.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from felix_agent.datastore.convert import API_VERSION, key_from_k8s
from felix_agent.datastore.keys import PLURAL
from felix_agent.model import CLUSTER_POLICY_KINDS, KINDS, BlockAffinity, Node, Record
from felix_agent.datastore.base import Backoff, Emit, EmittedState, RecordId, convert_or_log, record_id

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 500


@dataclass(frozen=True)
class WatchedResource:
    kind: str
    plural: str
    api: str  # "core" | "networking" | "custom" (a CRD's objects: group_version names it)
    method: str = ""  # the list method of that API class (core, networking)
    group_version: str = ""  # custom only, e.g. "policy.networking.k8s.io/v1alpha2"


RESOURCES = (
    WatchedResource("Namespace", "namespaces", "core", "list_namespace"),
    WatchedResource("Node", "nodes", "core", "list_node"),
    WatchedResource("Pod", "pods", "core", "list_pod_for_all_namespaces"),
    WatchedResource("NetworkPolicy", "networkpolicies", "networking",
                    "list_network_policy_for_all_namespaces"),
    # network-policy-api CRDs: optional, a cluster without them runs (see NotInstalled).
    *(WatchedResource(kind, PLURAL[kind], "custom", group_version=API_VERSION[kind])
      for kind in CLUSTER_POLICY_KINDS),
)
# How often a resource whose CRD is not installed is looked for again.
ABSENT_RECHECK_SECONDS = 30.0


# A listed object as its records (records_of), or (its id, None) when it did not convert.
Listed = tuple[RecordId | None, dict[RecordId, Record] | None]


def _listed(kind: str, obj: dict) -> Listed:
    rec = convert_or_log(obj, kind, f"{kind} list")
    if rec is None:
        return (kind, key_from_k8s(obj, kind)), None
    return None, records_of(kind, rec)


class Gone(Exception):
    """410: the resourceVersion or continue token is too old; relist from scratch."""


class NotInstalled(Exception):
    """404 on a custom resource: its CRD is not installed (the message says which)."""


class ApiUnavailable(Exception):
    """The API server could not be used; the message says why (for SyncStatus)."""


def api_client_from(kubeconfig: str | None = None, context: str | None = None) -> k8s_client.ApiClient:
    """An ApiClient from a kubeconfig file, else the in-cluster service account (inside a
    pod), else the default kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    cfg = k8s_client.Configuration()
    if kubeconfig:
        k8s_config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=cfg, persist_config=False)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_incluster_config(client_configuration=cfg)
    else:
        k8s_config.load_kube_config(context=context, client_configuration=cfg, persist_config=False)
    return k8s_client.ApiClient(cfg)


def records_of(kind: str, record: Record) -> dict[RecordId, Record]:
    """The records one API object yields: itself, plus a Node's blocks."""
    out = {record_id(record): record}
    if isinstance(record, Node):
        for cidr in record.pod_cidrs:
            b = BlockAffinity(cidr=cidr, node=record.name)
            out[record_id(b)] = b
    return out


def _explain(e: ApiException, what: str) -> str:
    msg = ""
    try:
        msg = json.loads(e.body or b"{}").get("message", "")
    except (ValueError, AttributeError):
        pass
    if e.status == 401:
        hint = "the credentials were rejected; check the kubeconfig or service-account token"
    elif e.status == 403:
        hint = f"RBAC: the agent needs list and watch on {what}"
    else:
        hint = e.reason or ""
    return f"{what}: HTTP {e.status} {msg or e.reason}" + (f" ({hint})" if hint and hint != msg else "")


def _iter_lines(resp) -> Iterator[bytes]:
    """The lines of a watch stream, as the chunks arrive."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


class _Worker(threading.Thread):
    """The blocking list/watch cycle of one resource; reports to the loop via `post`."""

    def __init__(self, syncer: "KubernetesSyncer", res: WatchedResource,
                 post: Callable[[tuple], None]):
        super().__init__(daemon=True, name=f"k8s-watch-{res.plural}")
        self.s = syncer
        self.res = res
        self.post = post
        self.stop = threading.Event()
        self._resp = None
        self._lock = threading.Lock()
        self.fn: Callable[..., Any] | None = None  # made in run(): building it takes ~1 s once

    def halt(self) -> None:
        """Stop, unblocking a read in progress (from another thread)."""
        self.stop.set()
        with self._lock:
            resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # already released or closed
                pass

    def _request(self, **kw):
        resp = self.fn(_preload_content=False, **kw)
        with self._lock:
            self._resp = resp
        if self.stop.is_set():
            resp.release_conn()
            raise InterruptedError
        return resp

    def _done(self, resp) -> None:
        with self._lock:
            self._resp = None
        try:
            resp.release_conn()
        except Exception:
            pass

    def list_all(self) -> tuple[str, list["Listed"]]:
        """All items via limit/continue pages, each page converted to records as it arrives
        (only one page's JSON is held at a time, never the whole list's: at 100k pods the
        raw objects are ten times the records). Raises Gone on 410 (list or continue)."""
        items: list[Listed] = []
        kind = self.res.kind
        cont = None
        while True:
            kw: dict[str, Any] = {"limit": self.s.page_size,
                                  "_request_timeout": (self.s.connect_timeout, 60)}
            if cont:
                kw["_continue"] = cont
            try:
                resp = self._request(**kw)
            except ApiException as e:
                if e.status == 410:
                    raise Gone(_explain(e, self.res.plural)) from None
                if e.status == 404 and self.res.api == "custom":
                    group, version = self.res.group_version.split("/")
                    raise NotInstalled(f"the CRD {self.res.plural}.{group} is not installed (or does not "
                                       f"serve {version}): {self.res.kind} objects are not enforced") from None
                raise
            try:
                body = json.loads(resp.data)
            finally:
                self._done(resp)
            items.extend(_listed(kind, obj) for obj in body.get("items") or ())
            meta = body.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                return meta.get("resourceVersion", ""), items

    def watch(self, rv: str) -> str:
        """Stream events from rv until the server ends the stream; returns the last rv.
        Raises Gone on a 410 (ERROR event or HTTP status)."""
        timeout = self.s.watch_timeout + random.randint(0, max(1, self.s.watch_timeout // 5))
        try:
            resp = self._request(watch=True, allow_watch_bookmarks=True, resource_version=rv,
                                 timeout_seconds=timeout,
                                 _request_timeout=(self.s.connect_timeout, timeout + 30))
        except ApiException as e:
            if e.status == 410:
                raise Gone(_explain(e, self.res.plural)) from None
            raise
        try:
            for line in _iter_lines(resp):
                if self.stop.is_set():
                    raise InterruptedError
                ev = json.loads(line)
                typ, obj = ev.get("type"), ev.get("object") or {}
                if typ == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", "410 Gone"))
                    raise ApiUnavailable(f"{self.res.plural} watch: error event {obj.get('code')} "
                                         f"{obj.get('message', '')}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = new_rv
                if typ in ("ADDED", "MODIFIED", "DELETED"):
                    self.post(("event", self.res.kind, typ, obj))
                # BOOKMARK: only the resourceVersion moves on.
        finally:
            self._done(resp)
        return rv

    def _list_function(self) -> Callable[..., Any]:
        if self.res.api == "custom":
            group, version = self.res.group_version.split("/")
            return functools.partial(k8s_client.CustomObjectsApi(self.s.api_client).list_cluster_custom_object,
                                     group, version, self.res.plural)
        api_cls = k8s_client.CoreV1Api if self.res.api == "core" else k8s_client.NetworkingV1Api
        return getattr(api_cls(self.s.api_client), self.res.method)

    def run(self) -> None:
        self.fn = self._list_function()
        backoff = Backoff(self.s.backoff.initial, self.s.backoff.maximum, self.s.backoff.factor)
        while not self.stop.is_set():
            try:
                rv, items = self.list_all()
                self.post(("listed", self.res.kind, items))
                backoff.reset()
                while not self.stop.is_set():
                    rv = self.watch(rv)
            except InterruptedError:
                return
            except Gone as e:
                log.info("%s: %s; relisting", self.res.plural, e)
            except NotInstalled as e:
                # Counts as an empty list (the kind has no objects) so the agent syncs;
                # looked for again now and then, so installing the CRD later just works.
                self.post(("absent", self.res.kind, str(e)))
                self.stop.wait(self.s.absent_recheck)
            except Exception as e:
                if self.stop.is_set():
                    return
                if isinstance(e, ApiException):
                    reason = _explain(e, self.res.plural)
                    if e.status in (401, 403):
                        log.error("kubernetes API refused %s", reason)
                else:
                    reason = f"{self.res.plural}: {type(e).__name__}: {e}"
                self.post(("lost", self.res.kind, reason))
                self.stop.wait(backoff.next())


class KubernetesSyncer:
    """The Syncer for the Kubernetes API (see base.py for the contract)."""

    def __init__(self, api_client: k8s_client.ApiClient | None = None, *,
                 kubeconfig: str | None = None, context: str | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, watch_timeout: int = 300,
                 connect_timeout: float = 5.0, backoff: Backoff | None = None,
                 resources: tuple[WatchedResource, ...] = RESOURCES,
                 absent_recheck: float = ABSENT_RECHECK_SECONDS):
        self.api_client = api_client or api_client_from(kubeconfig, context)
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff()
        self.resources = resources
        self.absent_recheck = absent_recheck
        self.lists: dict[str, int] = {r.kind: 0 for r in resources}  # per kind, for tests/metrics
        # kind -> why it is not watched (its CRD is missing); shown by `tortiectl status`.
        self.notes: dict[str, str] = {}

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple] = asyncio.Queue()
        state = EmittedState(emit)

        def post(msg: tuple) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, msg)
            except RuntimeError:  # loop closed: run() is over
                pass

        workers = [_Worker(self, r, post) for r in self.resources]
        listed: set[str] = set()
        # A kind's first list is emitted only after every kind before it in model.KINDS
        # (namespaces before their pods), whatever order the list threads finish in; watch
        # events that arrive while its list is held are replayed right after it.  A kind
        # that cannot be listed (e.g. 403) holds back only the kinds after it.
        order = sorted((r.kind for r in self.resources), key=KINDS.index)
        emitted: set[str] = set()
        pending: dict[str, list[dict]] = {}
        backlog: dict[str, list[tuple[str, dict]]] = {}
        for w in workers:
            w.start()
        try:
            while True:
                msg = await queue.get()
                if msg[0] == "absent":
                    _, kind, reason = msg
                    if self.notes.get(kind) != reason:
                        log.info("kubernetes API: %s", reason)  # once, not at every recheck
                    self.notes[kind] = reason
                    msg = ("listed", kind, [])
                elif msg[0] == "listed":
                    self.notes.pop(msg[1], None)
                if msg[0] == "listed":
                    _, kind, items = msg
                    self.lists[kind] += 1
                    listed.add(kind)
                    if kind in emitted:
                        self._replace(state, kind, items)
                    else:
                        pending[kind], backlog[kind] = items, []
                        for k in order:
                            if k in emitted:
                                continue
                            if k not in pending:
                                break
                            self._replace(state, k, pending.pop(k))
                            for typ, obj in backlog.pop(k):
                                self._apply(state, k, typ, obj)
                            emitted.add(k)
                    if len(listed) == len(workers) and not pending:
                        state.set_in_sync(True)
                elif msg[0] == "event":
                    _, kind, typ, obj = msg
                    if kind in pending:
                        backlog[kind].append((typ, obj))
                    else:
                        self._apply(state, kind, typ, obj)
                elif msg[0] == "lost":
                    _, kind, reason = msg
                    listed.discard(kind)
                    pending.pop(kind, None)
                    backlog.pop(kind, None)
                    if state.in_sync:
                        log.warning("lost the kubernetes API: %s; retrying", reason)
                    state.set_in_sync(False, reason)
        finally:
            for w in workers:
                w.halt()

    def _replace(self, state: EmittedState, kind: str, items: list["Listed"]) -> None:
        snapshot: dict[RecordId, Record] = {}
        for rid, recs in items:
            if recs is None:
                # Keep what the consumer has for an object that turned invalid.
                if rid in state.records:
                    snapshot.update(records_of(kind, state.records[rid]))
                continue
            snapshot.update(recs)
        scope = {kind, "BlockAffinity"} if kind == "Node" else {kind}
        state.replace(snapshot, scope)

    def _apply(self, state: EmittedState, kind: str, typ: str, obj: dict) -> None:
        rid = (kind, key_from_k8s(obj, kind))
        old = state.records.get(rid)
        old_records = records_of(kind, old) if old is not None else {}
        if typ == "DELETED":
            new_records: dict[RecordId, Record] = {}
        else:
            rec = convert_or_log(obj, kind, f"{kind} watch")
            if rec is None:
                return
            new_records = records_of(kind, rec)
        for r, v in new_records.items():
            state.update(r, v)
        for r in old_records:
            if r not in new_records:
                state.update(r, None)


__all__ = ["KubernetesSyncer", "api_client_from", "records_of", "RESOURCES", "WatchedResource"]
