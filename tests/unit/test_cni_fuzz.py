"""Generated configs and environments thrown at the plugin: every outcome is a valid
result or a valid CNI error, never a traceback (no root: CNI_NETNS does not exist, so a
config that passes validation ends at code 3 before anything is touched)."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_plugin.main import run
from podnet.versions import SUPPORTED_VERSIONS

WELL_KNOWN = {1, 2, 3, 4, 5, 6, 7}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 70000), st.floats(allow_nan=False),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                    st.dictionaries(st.text(max_size=8), c, max_size=3)),
                      max_leaves=8)
ipams = st.one_of(values, st.fixed_dictionaries({"type": st.sampled_from(["host-local", "tortie", "", "../x", 3])},
                                                optional={"subnet": values}))
configs = st.fixed_dictionaries(
    {},
    optional={
        "cniVersion": st.one_of(st.sampled_from(SUPPORTED_VERSIONS + ("0.2.0", "1.2.0", "")), values),
        "name": st.one_of(st.sampled_from(["net", "k8s-pod-network", "-x", ""]), values),
        "type": st.one_of(st.just("tortie"), values),
        "ipam": ipams, "mtu": st.one_of(st.integers(0, 70000), values), "dns": values,
        "prevResult": values, "runtimeConfig": values, "ipMasq": st.booleans(),
        "log_level": st.one_of(st.sampled_from(["debug", "INFO", "loud"]), values),
        "agent_socket": values, "agent_timeout": values, "args": values,
    })
envs = st.fixed_dictionaries(
    {"CNI_COMMAND": st.sampled_from(["ADD", "CHECK", "VERSION", "ADD", "bogus"])},
    optional={"CNI_CONTAINERID": st.sampled_from(["c1", "", "-x", "a/b"]),
              "CNI_IFNAME": st.sampled_from(["eth0", "", "x" * 20, "a:b"]),
              "CNI_ARGS": st.sampled_from(["", "IgnoreUnknown=1;X=1", "X=1", "junk"]),
              "CNI_PATH": st.just("/nonexistent")})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conf=st.one_of(configs, values), env=envs, raw=st.one_of(st.none(), st.binary(max_size=20)))
def test_any_input_gives_a_valid_answer(tmp_path_factory, conf, env, raw):
    env = dict(env, CNI_NETNS="/nonexistent/netns")
    if isinstance(conf, dict):
        conf.setdefault("log_file_path", str(tmp_path_factory.getbasetemp() / "fuzz.log"))
        conf.setdefault("state_dir", str(tmp_path_factory.getbasetemp() / "state"))
    data = raw if raw is not None else json.dumps(conf).encode()
    status, out = run(env, data)
    obj = json.loads(out)
    if status == 0:
        assert env["CNI_COMMAND"] == "VERSION" and obj["supportedVersions"] == list(SUPPORTED_VERSIONS)
        return
    assert obj["code"] in WELL_KNOWN, obj
    assert isinstance(obj["msg"], str) and obj["msg"]
    assert obj["cniVersion"] in SUPPORTED_VERSIONS
