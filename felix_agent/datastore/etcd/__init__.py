"""The etcd v3 datastore: every model object as Kubernetes-shaped JSON under one prefix
(layout in keys.py), written by tortiectl and the agents' publisher, watched by EtcdSyncer.

- records.py: a record's key and stored bytes, and the checks a stored value passes;
- store.py: EtcdStore, reads and writes over a connection of its own, and the
  compare-and-swap primitives;
- syncer.py: EtcdSyncer, list + watch with relist on any loss.
"""
from felix_agent.datastore.etcd.records import encode_record, record_key
from felix_agent.datastore.etcd.store import LIST_PAGE_KEYS, TXN_MAX_OPS, EtcdStore, EtcdUnavailable, parse_endpoint
from felix_agent.datastore.etcd.syncer import EtcdSyncer

__all__ = ["EtcdStore", "EtcdSyncer", "EtcdUnavailable", "LIST_PAGE_KEYS", "TXN_MAX_OPS", "encode_record",
           "parse_endpoint", "record_key"]
