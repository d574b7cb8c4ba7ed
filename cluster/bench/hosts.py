"""Test hosts on one machine: network namespaces joined by veth pairs and a bridge, and Ray across them.

    with TestHosts(("a", "b", "c")) as hosts:          # needs root; HostsUnavailable says why not
        hosts.run("b", ["hostname", "-I"])              # 10.251.0.2
        with RayHosts(hosts, head="a") as ray_hosts:    # Ray on every host, as the launcher file starts it
            ...

Each host is a network namespace `pdmn-<name>` with one interface, eth0,
holding 10.251.0.<i+1>/24 (a private test subnet that exists only inside
these namespaces); its veth peer `v<name>` sits on bridge br0 in a switch
namespace `pdmn-sw`, so nothing of this touches the machine's own network.
Processes run in a host with `ip netns exec`, and (for Ray) in a UTS
namespace of their own whose host name is the host's name. `link_bytes`
reads a host's link counters on the switch side; `cap` puts a `tc tbf`
rate limit on both directions of a host's link (`netem` is not available).

The namespaces share the machine's process table and file systems: every Ray
node gets its own --temp-dir, and nodes are stopped by their own process
groups and the processes found in their namespace (`ray stop` would end every
Ray on the machine). A lock file keeps two runs apart; `up` first removes what
a crashed earlier run left (its namespaces, and the processes inside them).
Every wait is bounded.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

PREFIX = "pdmn"
SUBNET = ipaddress.ip_network("10.251.0.0/24")
LOCK_PATH = "/tmp/pdcluster-test-hosts.lock"
TEMP_ROOT = "/tmp/pdmn"
REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "deploy" / "ray-cluster.yaml"


class HostsUnavailable(RuntimeError):
    """Test hosts cannot be made here (not root, no namespaces, the subnet in use, a run under way)."""


def _ip(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=timeout)


class TestHosts:
    __test__ = False   # not a pytest class

    def __init__(self, names=("a", "b", "c"), prefix: str = PREFIX) -> None:
        self.names = tuple(names)
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self._lock = None

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def address(self, name: str) -> str:
        return str(SUBNET.network_address + 1 + self.names.index(name))

    # -- life ------------------------------------------------------------------------------
    def __enter__(self) -> TestHosts:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> TestHosts:
        self._check()
        self._lock = open(LOCK_PATH, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise HostsUnavailable("another run holds the test hosts (lock file busy)") from None
        try:
            self._clean_leftovers()
            self._create()
        except subprocess.CalledProcessError as e:   # a kernel or sandbox without veth / bridges
            self.down()
            raise HostsUnavailable(f"cannot wire the test hosts ({' '.join(map(str, e.cmd))}): "
                                   f"{(e.stderr or '').strip()}") from None
        except BaseException:
            self.down()
            raise
        return self

    def _check(self) -> None:
        if os.geteuid() != 0:
            raise HostsUnavailable("test hosts need root (network namespaces, veth, tc)")
        for tool in ("ip", "tc", "unshare"):
            if shutil.which(tool) is None:
                raise HostsUnavailable(f"test hosts need `{tool}`, which is not installed")
        used = _ip("-4", "-j", "addr", check=False)
        for iface in json.loads(used.stdout or "[]"):
            for a in iface.get("addr_info", []):
                if ipaddress.ip_address(a["local"]) in SUBNET:
                    raise HostsUnavailable(f"the test subnet {SUBNET} is in use on {iface['ifname']}")
        probe = f"{self.prefix}-probe"
        made = _ip("netns", "add", probe, check=False)
        _ip("netns", "del", probe, check=False)
        if made.returncode != 0:
            raise HostsUnavailable(f"cannot make a network namespace here: {made.stderr.strip()}")
        uts = subprocess.run(["unshare", "--uts", "true"], capture_output=True, text=True, timeout=30)
        if uts.returncode != 0:
            raise HostsUnavailable(f"cannot give a test host its own host name (unshare --uts): {uts.stderr.strip()}")

    def _namespaces(self) -> list[str]:
        out = _ip("netns", "list", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(f"{self.prefix}-")]

    def _clean_leftovers(self) -> None:
        """A crashed run's namespaces, and the processes still inside them."""
        for ns in self._namespaces():
            for pid in self._ns_pids(ns):
                _kill(pid, signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
        shutil.rmtree(TEMP_ROOT, ignore_errors=True)

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for name in self.names:
            ns = self.ns(name)
            _ip("netns", "add", ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"v{name}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"v{name}", "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(name)}/{SUBNET.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        self._wait_reachable()

    def _wait_reachable(self, timeout_s: float = 20.0) -> None:
        """Every host reaches every other (a refused TCP connection is an answer: ping is not installed)."""
        probe = ("import socket,sys\nfor a in sys.argv[1:]:\n s=socket.socket(); s.settimeout(2)\n"
                 " try: s.connect((a, 9))\n except ConnectionRefusedError: pass\n finally: s.close()")
        deadline = time.monotonic() + timeout_s
        for name in self.names:
            others = [self.address(n) for n in self.names if n != name]
            while True:
                r = self.run(name, [sys.executable, "-c", probe, *others], check=False, timeout=10)
                if r.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise HostsUnavailable(f"test host {name} cannot reach the others: {r.stderr.strip()[-300:]}")
                time.sleep(0.2)

    def down(self) -> None:
        """Stop every process left in the hosts, remove the namespaces (their links go with them)."""
        try:
            for ns in self._namespaces():
                for pid in self._ns_pids(ns):
                    _kill(pid, signal.SIGKILL)
                _ip("netns", "del", ns, check=False)
            for name in self.names:   # the Ray nodes' temp dirs (their logs stay in TEMP_ROOT/logs)
                shutil.rmtree(f"{TEMP_ROOT}/{name}", ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    # -- use -------------------------------------------------------------------------------
    def command(self, name: str, argv: list[str], hostname: bool = False) -> list[str]:
        """`argv` as run inside host `name` (with `hostname`: in its own UTS namespace named `name`)."""
        if hostname:
            argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]
        return ["ip", "netns", "exec", self.ns(name), *argv]

    def run(self, name: str, argv: list[str], check: bool = True, timeout: float = 60, **kwargs):
        return subprocess.run(self.command(name, argv), check=check, capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def popen(self, name: str, argv: list[str], hostname: bool = False, **kwargs) -> subprocess.Popen:
        """A process in host `name`, in a session of its own (stop it with `stop`)."""
        return subprocess.Popen(self.command(name, argv, hostname), start_new_session=True, **kwargs)

    def pids(self, name: str) -> list[int]:
        return self._ns_pids(self.ns(name))

    @staticmethod
    def _ns_pids(ns: str) -> list[int]:
        out = _ip("netns", "pids", ns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    def link_bytes(self, name: str) -> dict[str, int]:
        """Bytes through host `name`'s link since it was made: "in" to the host, "out" from it
        (counted on the switch's side, where its tx is the host's in)."""
        out = _ip("-n", self.switch, "-s", "-j", "link", "show", f"v{name}").stdout
        stats = json.loads(out)[0]["stats64"]
        return {"in": int(stats["tx"]["bytes"]), "out": int(stats["rx"]["bytes"])}

    def cap(self, name: str, rate: str = "1gbit", burst: str = "1mb") -> None:
        """Limit host `name`'s link to `rate`, both ways (tc tbf on each end of its veth)."""
        for ns, dev in ((self.ns(name), "eth0"), (self.switch, f"v{name}")):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                            "rate", rate, "burst", burst, "latency", "50ms"], check=True, capture_output=True,
                           timeout=30)

    def uncap(self, name: str) -> None:
        for ns, dev in ((self.ns(name), "eth0"), (self.switch, f"v{name}")):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=30)


def line_queue(stream) -> queue.Queue:
    """The lines of `stream` (a process's stdout, sys.stdin) as they come, read by a daemon thread;
    None after the last."""
    q: queue.Queue = queue.Queue()

    def read():
        for line in stream:
            q.put(line)
        q.put(None)
    threading.Thread(target=read, daemon=True).start()
    return q


def stop(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """End a process started by `TestHosts.popen` and its whole session: TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # whatever it started in its session
    except ProcessLookupError:
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- Ray across the hosts ---------------------------------------------------------------------------

def launcher_commands(path: Path = LAUNCHER) -> dict[str, str]:
    """The `ray start` lines of the launcher file, for "head" and "worker" nodes."""
    cfg = yaml.safe_load(path.read_text())
    pick = {}
    for role, key in (("head", "head_start_ray_commands"), ("worker", "worker_start_ray_commands")):
        starts = [c for c in cfg[key] if " ray start" in f" {c}" or "/ray start" in c]
        if len(starts) != 1:
            raise ValueError(f"{path}: {key} must hold one `ray start` command, got {starts}")
        pick[role] = starts[0]
    return pick


def node_command(line: str, head_ip: str, temp_dir: str, num_cpus: int, object_store_bytes: int,
                 head: bool) -> str:
    """A launcher `ray start` line as the test hosts run it: the project and Ray from this checkout
    and this venv; no autoscaling config (no launcher runs here); and, because the hosts share one
    machine, its own --temp-dir, --block (stopped by its process group) and a small share of it."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    line = line.replace("~/pdcluster/.venv/bin/ray", ray_bin).replace("~/pdcluster", str(REPO))
    line = re.sub(r"\s--autoscaling-config=\S+", "", line).replace("$RAY_HEAD_IP", head_ip)
    return (f"{line} --block --temp-dir={temp_dir} --num-cpus={num_cpus} --object-store-memory={object_store_bytes}"
            f"{' --include-dashboard=false' if head else ''} --disable-usage-stats")


class RayHosts:
    """A Ray cluster over test hosts, started with the launcher file's commands (token auth)."""

    def __init__(self, hosts: TestHosts, head: str = "a", num_cpus: dict | None = None,
                 object_store_bytes: int = 96 * 2**20, log_dir: str | None = None) -> None:
        self.hosts, self.head = hosts, head
        self.num_cpus = num_cpus or {}
        self.object_store_bytes = object_store_bytes
        self.token = secrets.token_hex(32)
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_dir = Path(log_dir or f"{TEMP_ROOT}/logs")

    @property
    def address(self) -> str:
        return f"{self.hosts.address(self.head)}:6379"

    def env(self) -> dict:
        """What every process of the cluster needs: the token, and this checkout first on the path."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        return env

    def __enter__(self) -> RayHosts:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0) -> RayHosts:
        try:
            for name in [self.head, *[n for n in self.hosts.names if n != self.head]]:
                self.start_node(name, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, name: str, timeout_s: float = 120.0) -> None:
        """(Re)start host `name`'s Ray node with the launcher file's command; waits until it is alive."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        head = name == self.head
        line = node_command(launcher_commands()["head" if head else "worker"], self.hosts.address(self.head),
                            f"{TEMP_ROOT}/{name}", self.num_cpus.get(name, 2), self.object_store_bytes, head)
        log = open(self.log_dir / f"ray-{name}.log", "a")
        before = self._active_nodes() if self.procs else set()
        self.procs[name] = self.hosts.popen(name, ["bash", "-c", line], hostname=True, env=self.env(),
                                            stdout=log, stderr=subprocess.STDOUT)
        self._wait_nodes(len(self.procs), timeout_s, new_than=before)

    def kill_node(self, name: str) -> None:
        """Host `name` loses its Ray node at once: SIGKILL to the node's processes and every process
        in the host (its Ray workers), as a machine that loses power."""
        proc = self.procs.pop(name)
        for pid in [*self.hosts.pids(name), proc.pid]:
            _kill(pid, signal.SIGKILL)
        stop(proc, timeout_s=0)

    def _active_nodes(self) -> set[str]:
        """The node ids Ray's own CLI lists as active (asked from the head's host)."""
        r = subprocess.run(self.hosts.command(self.head, [str(Path(sys.executable).parent / "ray"), "status",
                                                          "--address", self.address]),
                           capture_output=True, text=True, env=self.env(), timeout=60)
        active = re.search(r"Active:\s*\n((?:\s+\d+ \S+\n)+)", r.stdout)
        return set(re.findall(r"^\s+\d+ (\S+)", active.group(1), re.M)) if active else set()

    def _wait_nodes(self, count: int, timeout_s: float, new_than: set[str] = frozenset()) -> None:
        """Until `count` nodes are alive, one of them not in `new_than` if that is given (a node that
        came back: the one it replaces may still be listed until Ray declares it dead)."""
        deadline = time.monotonic() + timeout_s
        nodes: set[str] = set()
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"the Ray node on host {name} exited ({proc.returncode}); see "
                                       f"{self.log_dir}/ray-{name}.log")
            nodes = self._active_nodes()
            if len(nodes) >= count and (not new_than or nodes - new_than):
                return
            time.sleep(1.0)
        raise RuntimeError(f"{count} Ray node(s) not alive after {timeout_s:.0f}s; active: {sorted(nodes)}")

    def stop(self) -> None:
        """Each node by its own process group, then whatever is left in its host (Ray's workers)."""
        for name in reversed(list(self.procs)):
            stop(self.procs[name])
        for name in self.procs:
            for pid in self.hosts.pids(name):
                _kill(pid, signal.SIGKILL)
        self.procs.clear()
