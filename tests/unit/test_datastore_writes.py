"""Every write the agent makes to the datastore goes through the datastore's Publisher
(felix_agent/datastore/publisher.py): no other module of the agent calls EtcdStore's
writing methods.  Fails when a write is added elsewhere (e.g. back in the agent's loop or
an IPAM backend), which would make what an agent may change in a cluster hard to see."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
WRITES = {"put_record", "put_records", "put_object", "delete_if_value", "create_if_absent",
          "replace_if_value", "compact"}
ALLOWED = {"felix_agent/datastore/publisher.py", "felix_agent/datastore/etcd/store.py"}


def writes_in(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{node.lineno}: .{node.func.attr}()" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITES]


def test_only_the_publisher_writes():
    found = {}
    for path in sorted((ROOT / "felix_agent").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel not in ALLOWED and (calls := writes_in(path)):
            found[rel] = calls
    assert not found, f"datastore writes outside felix_agent/datastore/publisher.py: {found}"


def test_the_publisher_is_seen_writing():
    """The scan recognises the calls it looks for (else the test above could not fail)."""
    assert writes_in(ROOT / "felix_agent/datastore/publisher.py")
