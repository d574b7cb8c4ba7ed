"""A worker in a process of its own, built and hosted as a WorkerActor does it, without Ray.

    python -m tests.worker_process ROLE NAME ROUTER_ENDPOINT CONFIG_JSON

`CONFIG_JSON`: the overrides of a ClusterConfig (model.path names the model).
The worker is built by `cluster.worker_factory.build_worker` and served by
`cluster.worker_host.WorkerHost`, whose replies and heartbeats go to
ROUTER_ENDPOINT (the test's PULL socket). Prints "READY <command endpoint>"
once it serves; stops cleanly (host.stop()) when its stdin closes, unless a
fault point (`faults` in the config) kills it first. `WorkerProcess` is the
test side: it plays the router over those two sockets.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from protos import worker_pb2 as wpb

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0


def main() -> None:
    from cluster.config import load_config
    from cluster.worker_factory import build_worker
    from cluster.worker_host import WorkerHost

    role, name, router_endpoint, overrides = sys.argv[1:5]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    cfg = load_config(None, json.loads(overrides))
    host = WorkerHost(build_worker(role, name, cfg, cfg.model.path), router_endpoint)
    host.start()
    print("READY", host.command_endpoint, flush=True)
    sys.stdin.read()   # until the test closes it
    host.stop()


class WorkerProcess:
    """The router's side of one worker process: commands out, replies and heartbeats in."""

    def __init__(self, ctx: zmq.Context, role: str, name: str, overrides: dict) -> None:
        self.name = name
        self.replies = ctx.socket(zmq.PULL)
        self.replies.setsockopt(zmq.LINGER, 0)
        port = self.replies.bind_to_random_port("tcp://127.0.0.1")
        self.log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.worker_process", role, name, f"tcp://127.0.0.1:{port}",
             json.dumps(overrides)], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True)
        self.pid = self.proc.pid
        self.received: list[wpb.FromWorker] = []
        self.arrivals: list[float] = []   # monotonic time each message came
        try:
            self.command_endpoint = self._ready()
        except BaseException:
            self.close()
            raise
        self.commands = ctx.socket(zmq.PUSH)
        self.commands.setsockopt(zmq.LINGER, 0)
        self.commands.connect(self.command_endpoint)

    def _ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline()
                if line.startswith("READY "):
                    return line.split()[1]
                if not line:
                    break
        raise RuntimeError(f"{self.name} did not start:\n{self.stderr()}")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-6000:]

    def send(self, **command) -> None:
        self.commands.send(wpb.ToWorker(**command).SerializeToString())

    def receive(self, until, timeout_s: float = 60.0, between=None) -> None:
        """Take messages until `until()` is true (bounded); `between()` runs while waiting
        (the test's in-process peer steps there)."""
        deadline = time.monotonic() + timeout_s
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: not there after {timeout_s}s ({len(self.received)} messages, "
                                   f"exit code {self.proc.poll()})\n{self.stderr()}")
            if self.replies.poll(1 if between is not None else 20):
                self._take()
            if between is not None:
                between()

    def _take(self) -> None:
        while True:
            try:
                data = self.replies.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.received.append(wpb.FromWorker.FromString(data))
            self.arrivals.append(time.monotonic())

    def wait_killed(self, timeout_s: float = 60.0, between=None) -> None:
        """Until the process is gone: it must have killed itself with SIGKILL. Every message it
        sent before is taken in."""
        self.receive(lambda: self.proc.poll() is not None, timeout_s, between)
        time.sleep(0.2)   # what the kernel already holds for our socket
        self._take()
        assert self.proc.returncode == -signal.SIGKILL, f"exit code {self.proc.returncode}\n{self.stderr()}"

    def news(self) -> list[wpb.FromWorker]:
        """The messages that were not heartbeats."""
        return [m for m in self.received if m.prefilled or m.tokens or m.failed or m.offered]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.stdout.close()
        self.replies.close(0)
        if hasattr(self, "commands"):
            self.commands.close(0)
        self.log.close()


if __name__ == "__main__":
    main()
