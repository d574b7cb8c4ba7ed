"""The router's zmq links to the workers: one PUSH per worker out, one PULL for all replies in.

With the cluster's keys every link is CurveZMQ (`kv_transfer.curve`): only workers holding
them can reach the reply socket, and only they accept the router's commands."""
from __future__ import annotations

import logging

import zmq
import zmq.asyncio
from google.protobuf.message import DecodeError

from kv_transfer.curve import CurveGuard, ZmqKeys, connect_securely
from protos import worker_pb2 as wpb

log = logging.getLogger(__name__)


class WorkerLinks:
    def __init__(self, host: str = "127.0.0.1", keys: ZmqKeys | None = None) -> None:
        self._ctx = zmq.asyncio.Context()
        self._keys = keys
        self._guard = CurveGuard(self._ctx, keys)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._guard.serve(self._pull)
        port = self._pull.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"   # workers connect their PUSH here
        self._push: dict[str, zmq.asyncio.Socket] = {}

    def connect(self, name: str, command_endpoint: str) -> None:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        connect_securely(sock, self._keys)
        sock.connect(command_endpoint)
        self._push[name] = sock

    def disconnect(self, name: str) -> None:
        """Drop a worker's command socket (it died): what was queued for it is discarded."""
        sock = self._push.pop(name, None)
        if sock is not None:
            sock.close(0)

    def send(self, name: str, msg: wpb.ToWorker) -> bool:
        """Queue a command for a worker; False when it cannot take it now (gone or flooded)."""
        sock = self._push.get(name)
        if sock is None:
            return False
        try:
            sock.send(msg.SerializeToString(), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    async def recv(self) -> wpb.FromWorker | None:
        """The next worker message; None for one that does not parse (logged, dropped)."""
        data = await self._pull.recv()
        try:
            return wpb.FromWorker.FromString(data)
        except DecodeError:
            log.warning("dropped a malformed worker message of %d bytes", len(data))
            return None

    def close(self) -> None:
        for sock in self._push.values():
            sock.close(0)
        self._pull.close(0)
        self._guard.close()
        self._ctx.term()
