"""Stand-ins and harnesses for tests: a kube-apiserver replaying recorded v1.28 responses
(apiserver.py) and a recorder for Syncer event streams (recorder.py)."""
