"""Three test hosts with Ray across them, shared by every multi-node test of the session.

Host A (10.251.0.1) runs the Ray head and the router (a `Cluster` driver,
tests/multinode/agent.py, or `pdcluster serve`); hosts B and C (.2, .3) run
Ray nodes for the workers. Each node is started with the launcher file's own
`ray start` command (cluster/bench/hosts.py), so it carries a custom resource
and a label naming its host (host_b: 100, host=b) and Ray's token auth. Needs
root; where namespaces cannot be made the tests skip and say why. Everything
is torn down at the end of the session, also when a test fails.
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time

import pytest

from cluster.bench.hosts import REPO, TEMP_ROOT, HostsUnavailable, RayHosts, TestHosts, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NUM_CPUS = {"a": 0, "b": 4, "c": 4}   # the head runs the router only; workers go to B and C


def base_config(ray_address: str, **sections) -> dict:
    """A cluster on the test hosts: fp32 (token for token against the engine), small caches."""
    base = {
        "model": {"dtype": "float32"},
        "prefill": {"kv_cache_memory_gb": 0.2},
        "decode": {"kv_cache_memory_gb": 0.2},
        "router": {"host": "auto", "port": 0, "drain_timeout_s": 5},
        "ray": {"address": ray_address, "placement_timeout_s": 20},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


@pytest.fixture(scope="session")
def hosts():
    try:
        h = TestHosts(("a", "b", "c")).up()
    except HostsUnavailable as e:
        pytest.skip(f"no test hosts here: {e}")
    try:
        yield h
    finally:
        h.down()


@pytest.fixture(scope="session")
def ray_hosts(hosts):
    r = RayHosts(hosts, head="a", num_cpus=NUM_CPUS).start()
    try:
        yield r
    finally:
        r.stop()


class Driver:
    """tests/multinode/agent.py on host A; `request` waits for its answer, bounded."""

    def __init__(self, hosts: TestHosts, ray_hosts: RayHosts) -> None:
        self.log_path = f"{TEMP_ROOT}/logs/agent-{int(time.time())}.log"
        self._log = open(self.log_path, "w")
        self.proc = hosts.popen("a", [sys.executable, "-m", "tests.multinode.agent"], env=ray_hosts.env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                cwd=str(REPO))
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, op: str, **args) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def request(self, op: str, timeout_s: float = 300.0, **args) -> dict:
        self.send(op, **args)
        return self.answer(op, timeout_s)

    def answer(self, op: str, timeout_s: float = 300.0) -> dict:
        """The reply to the request sent last (`send`), bounded."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"the cluster driver did not answer {op} in {timeout_s:.0f}s "
                               f"(log: {self.log_path})") from None
        if line is None:
            raise RuntimeError(f"the cluster driver exited; log: {self.log_path}\n{self.tail()}")
        return json.loads(line)

    def call(self, op: str, timeout_s: float = 300.0, **args) -> dict:
        reply = self.request(op, timeout_s, **args)
        if not reply["ok"]:
            raise RuntimeError(f"{op} failed: {reply['error']}\n{self.tail()}")
        return reply

    def tail(self, n: int = 4000) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-n:]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop(self.proc)
        self._log.close()


@pytest.fixture(scope="module")
def driver(hosts, ray_hosts):
    d = Driver(hosts, ray_hosts)
    try:
        yield d
    finally:
        d.close()


