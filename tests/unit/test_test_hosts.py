"""Where test hosts cannot be made, the harness says why (the multi-node tests skip with that reason)."""
from __future__ import annotations

import pytest

from cluster.bench import hosts as hosts_mod
from cluster.bench.hosts import HostsUnavailable, TestHosts


def test_without_root_there_are_no_test_hosts_and_the_reason_says_so(monkeypatch):
    monkeypatch.setattr(hosts_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(HostsUnavailable, match="need root"):
        TestHosts(("a", "b")).up()


def test_a_missing_tool_is_named(monkeypatch):
    monkeypatch.setattr(hosts_mod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(hosts_mod.shutil, "which", lambda tool: None if tool == "tc" else f"/usr/bin/{tool}")
    with pytest.raises(HostsUnavailable, match="`tc`"):
        TestHosts(("a", "b")).up()


def test_addresses_come_from_the_private_test_subnet_in_host_order():
    h = TestHosts(("a", "b", "c"))
    assert [h.address(n) for n in "abc"] == ["10.251.0.1", "10.251.0.2", "10.251.0.3"]
    assert h.ns("b") == "pdmn-b"
    assert h.command("b", ["true"], hostname=True)[:5] == ["ip", "netns", "exec", "pdmn-b", "unshare"]


def test_a_machine_that_cannot_wire_the_hosts_is_a_reason_too_and_nothing_is_left(monkeypatch, tmp_path):
    # a kernel or sandbox without veth or bridges: the wiring's `ip` failure becomes the skip reason
    if hosts_mod.os.geteuid() != 0 or hosts_mod.shutil.which("ip") is None:
        pytest.skip("needs root and `ip` to get as far as the wiring")

    def create_without_bridges(self):
        hosts_mod._ip("netns", "add", self.switch)
        hosts_mod._ip("-n", self.switch, "link", "add", "br0", "type", "no-such-link-type")

    monkeypatch.setattr(TestHosts, "_create", create_without_bridges)
    monkeypatch.setattr(hosts_mod, "LOCK_PATH", str(tmp_path / "hosts.lock"))   # the multi-node suite may hold its own
    h = TestHosts(("a", "b"), prefix="pdut")   # not the multi-node suite's namespaces
    try:
        h.up()
    except HostsUnavailable as e:
        assert "cannot wire the test hosts" in str(e) and "no-such-link-type" in str(e)
    else:
        pytest.fail("the failed wiring was not reported as HostsUnavailable")
    assert h._namespaces() == []   # the switch namespace it made is gone again
