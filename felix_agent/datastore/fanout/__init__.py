"""The fan-out for the kubernetes datastore (Typha's job in Calico): one server process
watches the API and serves many agents, one TCP connection each, so the API server sees
one watch per resource instead of one per node.

- protocol.py: the framing and the messages both sides speak (versioned hello);
- server.py: FanoutServer (the KubernetesSyncer once, its snapshot, the clients);
- client.py: FanoutSyncer, the agent's Syncer over one connection to a server;
- main.py: the `tortie-fanout` command.
"""
