"""Runs a worker object's step loop on a thread, between two zmq sockets.

    commands:  router PUSH -> PULL here (ToWorker)     bound on `host`, random port
    replies:   PUSH here -> router PULL (FromWorker)   after every step with news,
               and a prefill worker's early offers (stream_layers) as they are made

The loop owns the worker: commands are applied between steps, so a worker
never sees two threads. When the worker has nothing to do the loop sleeps in
zmq's poll until a command arrives (or its next wake-up time); an idle worker
still sends a snapshot every HEARTBEAT_S so the router knows it is alive.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Protocol

import zmq
from google.protobuf.message import DecodeError

from engine.block_manager import BlockManager
from protos import worker_pb2 as wpb

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0


class Worker(Protocol):
    """What this loop drives: a prefill, decode or colocated worker object."""

    name: str
    role: str
    blocks: BlockManager
    stream_layers: bool   # a prefill worker that hands out early offers through `on_offer`

    def handle(self, msg: wpb.ToWorker, now: float) -> None: ...
    def step(self, now: float) -> wpb.FromWorker | None: ...
    def load(self) -> wpb.Load: ...
    def is_idle(self) -> bool: ...
    def next_wakeup(self, now: float) -> float | None: ...
    def wait_sockets(self) -> list | None: ...
    def close(self) -> None: ...


class WorkerHost:
    def __init__(self, worker: Worker, router_endpoint: str, host: str = "127.0.0.1") -> None:
        self.worker = worker
        self._ctx = zmq.Context()
        self._cmd = self._ctx.socket(zmq.PULL)
        self._cmd.setsockopt(zmq.LINGER, 0)
        port = self._cmd.bind_to_random_port(f"tcp://{host}")
        self.command_endpoint = f"tcp://{host}:{port}"
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 1000)
        self._out.connect(router_endpoint)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None     # the last unexpected exception of the loop
        if worker.stream_layers:
            worker.on_offer = self._send_early_offer

    def _send_early_offer(self, req_id: str, offer: bytes) -> None:
        """Called inside the worker's step (this loop's thread): the router binds a decode
        instance now, so it pulls each layer while this prefill still runs."""
        msg = wpb.FromWorker(instance=self.worker.name, offered=[wpb.EarlyOffer(req_id=req_id, offer=offer)])
        self._out.send(msg.SerializeToString())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"{self.worker.name}-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._cmd.close(0)
        self._out.close()
        self._ctx.term()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._cmd, zmq.POLLIN)
        last_sent = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self._drain_commands(now)
                try:
                    out = self.worker.step(now)
                except Exception:   # a bug must not silently kill the loop: log it, keep serving
                    self.error = traceback.format_exc()
                    log.error("%s step failed:\n%s", self.worker.name, self.error)
                    out = None
                if out is None and time.monotonic() - last_sent > HEARTBEAT_S:
                    out = wpb.FromWorker(instance=self.worker.name, load=self.worker.load())
                if out is not None:
                    self._out.send(out.SerializeToString())
                    last_sent = time.monotonic()
                wake = self.worker.next_wakeup(time.monotonic())
                if wake is None or wake > 0:
                    wait = HEARTBEAT_S if wake is None else min(wake, HEARTBEAT_S)
                    self._sleep(poller, wait)
        finally:
            self.worker.close()

    def _sleep(self, poller: zmq.Poller, wait: float) -> None:
        """Until a command, a message on the worker's transfer sockets, or `wait` seconds:
        a worker waiting on a transfer sleeps instead of spinning (2 cores, shared)."""
        extra = self.worker.wait_sockets() or []
        for sock in extra:
            poller.register(sock, zmq.POLLIN)
        try:
            poller.poll(max(1, int(wait * 1000)) if wait >= 0.001 else 0)
        finally:
            for sock in extra:
                poller.unregister(sock)

    def _drain_commands(self, now: float) -> None:
        while True:
            try:
                data = self._cmd.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = wpb.ToWorker.FromString(data)
            except DecodeError:
                log.warning("%s dropped a malformed command of %d bytes", self.worker.name, len(data))
                continue
            try:
                self.worker.handle(msg, now)
            except Exception:
                self.error = traceback.format_exc()
                log.error("%s could not handle a command:\n%s", self.worker.name, self.error)
