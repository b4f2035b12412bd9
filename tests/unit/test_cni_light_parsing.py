"""What the binary's no-agent path does without ipaddress, dataclasses and json reads and
writes what those did: pod addresses (podnet.result.parse_interface against
ipaddress.ip_interface) and the attachment records (the file bytes as before)."""
import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_plugin.attachments import Attachment, AttachmentStore
from cni_plugin.commands import pod_addresses
from podnet.plumbing import _parse_ips
from podnet.errors import INVALID_ENV, CNIError
from podnet.result import Result, parse_interface

TRICKY = [
    "10.0.0.1", "10.0.0.1/32", "10.0.0.1/24", "0.0.0.0/0", "255.255.255.255/32", "1.2.3.4/033",
    "1.2.3.4/255.255.255.0", "1.2.3.4/0.0.0.255", "1.2.3.4/0.0.0.0", "1.2.3.4/255.255.255.255",
    "::", "::/0", "::1/128", "1::", "1::/64", "1:0:0:1:0:0:0:1", "1:0:0:1:0:0:1:1", "0:0:1:0:0:1:0:0",
    "FD00::0001/128", "fd00:0:0:0:0:0:0:5/64", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "1:0:2:3:4:5:6:7",
    "2001:db8::/0128", "::ffff:1.2.3.4/128", "::1.2.3.4", "1:2:3:4:5:6:1.2.3.4", "fe80::1%eth0/64",
    # refused, as ipaddress refuses them
    "01.2.3.4/32", "1.2.3.4/", "1.2.3.4/33", "1.2.3.4/a/b", "1.2.3.4/255.0.255.0", "1.2.3", "256.1.1.1",
    " 1.2.3.4", "1.2.3.4 ", "", "/", "1.2.3.4/+8", "1.2.3.4/ 8", "::/-0", "1:2:3:4:5:6:7:8/129",
    "fe80::1%/64", "fe80::1%a%b", "1.2.3.4/\u0663", "1.2.3.4\x00", ":::", "1::2::3", "12345::", "g::",
]


def _ref(text):
    try:
        i = ipaddress.ip_interface(text)
    except ValueError:
        return None
    return str(i.ip), i.version, i.network.prefixlen, str(i)


def _mine(text):
    try:
        i = parse_interface(text)
    except ValueError:
        return None
    return i.ip, i.version, i.network.prefixlen, str(i)


@pytest.mark.parametrize("text", TRICKY)
def test_parse_interface_reads_what_ipaddress_reads(text):
    assert _mine(text) == _ref(text)


_group = st.sampled_from([0, 0, 0, 1, 0xABC, 0xFFFF])


@settings(max_examples=300, deadline=None)
@given(groups=st.lists(_group, min_size=8, max_size=8), prefix=st.integers(0, 130),
       form=st.sampled_from(["exploded", "short", "upper"]))
def test_v6_text_is_ipaddress_text(groups, prefix, form):
    """The compression of zero runs (longest, first of equals, never a single group)."""
    full = ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups))
    text = {"exploded": full.exploded, "short": ":".join(f"{g:x}" for g in groups),
            "upper": full.compressed.upper()}[form]
    assert _mine(f"{text}/{prefix}") == _ref(f"{text}/{prefix}")


def test_pod_addresses_and_plumbing_parse_as_before():
    res = Result.from_dict({"ips": [{"address": "10.22.0.5/24"}, {"address": "FD00:0:0::0005/64"}]})
    assert pod_addresses(res) == ["10.22.0.5/32", "fd00::5/128"]
    parsed = _parse_ips(pod_addresses(res))
    assert [(a.ip, a.version, a.network.prefixlen, str(a)) for a in parsed] == [
        ("10.22.0.5", 4, 32, "10.22.0.5/32"), ("fd00::5", 6, 128, "fd00::5/128")]
    for bad, msg in [("10.0.0.1/24", "pod address 10.0.0.1/24 must be a /32"),
                     ("nope", "'nope' is not an address in CIDR form"),
                     ("fd00::1/64", "pod address fd00::1/64 must be a /128")]:
        with pytest.raises(CNIError) as e:
            _parse_ips([bad])
        assert (e.value.code, e.value.msg) == (INVALID_ENV, msg)


def test_attachment_record_file_is_what_dataclasses_and_json_wrote(tmp_path):
    store = AttachmentStore(str(tmp_path), "net")
    att = Attachment("c1", "eth0", "cali0123456789a", "/var/run/netns/p", "host-local",
                     "K8S_POD_NAME=p\u00e9", ["10.0.0.5/32", "fd00::5/128"], True)
    store.save(att)
    written = (tmp_path / "net" / "c1@eth0.json").read_text()
    # dataclasses.asdict + json.dump: the fields in declaration order, json's separators
    assert written == json.dumps({"container_id": "c1", "ifname": "eth0", "host_ifname": "cali0123456789a",
                                  "netns": "/var/run/netns/p", "ipam_type": "host-local",
                                  "cni_args": "K8S_POD_NAME=p\u00e9", "ips": ["10.0.0.5/32", "fd00::5/128"],
                                  "complete": True})
    assert store.load("c1", "eth0") == att and store.all() == [att]
    assert Attachment("c", "eth0", "x").ips == [] and Attachment("c", "eth0", "x").ips is not \
        Attachment("c", "eth0", "x").ips  # a fresh list each, as field(default_factory=list)


@pytest.mark.parametrize("content", ['{"container_id": "c1"}', '{"container_id": "c1", "ifname": "eth0", '
                                     '"host_ifname": "x", "surprise": 1}', "[1, 2]", '{"container_id": ',
                                     "\udcff"])
def test_a_torn_or_foreign_record_reads_as_absent(tmp_path, content):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "c1@eth0.json").write_text(content, errors="surrogateescape")
    assert AttachmentStore(str(tmp_path), "net").load("c1", "eth0") is None
