"""CurveZMQ on the cluster's sockets: only processes holding the cluster's key get through.

A cluster makes one CURVE key pair when it starts (`ZmqKeys.generate`) and
hands it to every worker in its actor arguments (Ray's own channel is
token-authenticated). Every socket that listens (a worker's command PULL, a
prefill worker's KV ROUTER, the router's reply PULL) is a CURVE server; every
socket that connects is a CURVE client with the same pair. A ZAP handler on
each listening context (`CurveGuard`) admits a client only if the long-term
key it proved in the handshake is the cluster's public key:

    guard = CurveGuard(ctx, keys)      # before any server socket of ctx binds
    guard.serve(sock); sock.bind(...)
    connect_securely(client_sock, keys); client_sock.connect(...)
    ...
    guard.close()                      # before ctx.term()

A process without the secret key cannot finish the handshake: it reads
nothing, and what it sends is dropped by zmq before any of our code sees it.
Every message after the handshake is encrypted and authenticated
(XSalsa20-Poly1305, libsodium). `keys=None` turns all of this off (plain
zmq: the transfer tests and benchmarks that measure the bare channel).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import zmq
from zmq.utils import z85

ZAP_ENDPOINT = "inproc://zeromq.zap.01"   # fixed by the ZAP spec (RFC 27), one per context
DOMAIN = b"pdcluster"


@dataclass(frozen=True)
class ZmqKeys:
    """The cluster's CURVE key pair, Z85 text (plain data: it travels in actor arguments)."""
    public: str
    secret: str

    @classmethod
    def generate(cls) -> ZmqKeys:
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support: the cluster's sockets cannot be authenticated")
        public, secret = zmq.curve_keypair()
        return cls(public.decode(), secret.decode())

    def __repr__(self) -> str:   # never print the secret into a log
        return f"ZmqKeys(public={self.public!r}, secret=...)"


def connect_securely(sock: zmq.Socket, keys: ZmqKeys | None) -> None:
    """Make `sock` a CURVE client of a cluster server (before it connects); no-op without keys."""
    if keys is None:
        return
    sock.curve_secretkey = keys.secret.encode()
    sock.curve_publickey = keys.public.encode()
    sock.curve_serverkey = keys.public.encode()


class CurveGuard:
    """The ZAP handler of one zmq context: admits CURVE clients holding the cluster's key only."""

    def __init__(self, ctx: zmq.Context, keys: ZmqKeys | None) -> None:
        self.keys = keys
        self._thread: threading.Thread | None = None
        if keys is None:
            return
        self._allowed = z85.decode(keys.public.encode())
        # sync sockets even on an asyncio context: they are used on this guard's own thread
        self._zap = ctx.socket(zmq.REP, socket_class=zmq.Socket)
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)
        pipe_at = f"inproc://pdcluster-zap-stop-{id(self)}"
        self._stop_rx = ctx.socket(zmq.PAIR, socket_class=zmq.Socket)
        self._stop_rx.bind(pipe_at)
        self._stop_tx = ctx.socket(zmq.PAIR, socket_class=zmq.Socket)
        self._stop_tx.linger = 0
        self._stop_tx.connect(pipe_at)
        self.num_denied = 0
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)
        self._thread.start()

    def serve(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server (before it binds); no-op without keys."""
        if self.keys is None:
            return
        sock.curve_server = True
        sock.curve_secretkey = self.keys.secret.encode()
        sock.curve_publickey = self.keys.public.encode()
        sock.zap_domain = DOMAIN

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._stop_rx, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._stop_rx in events:
                    return
                if self._zap in events:
                    self._zap.send_multipart(self._answer(self._zap.recv_multipart()))
        finally:
            self._zap.close(0)
            self._stop_rx.close(0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        """RFC 27: version, request id, domain, address, identity, mechanism, credentials..."""
        request_id = request[1] if len(request) > 1 else b""
        mechanism = request[5] if len(request) > 5 else b""
        credentials = request[6:]
        ok = mechanism == b"CURVE" and len(credentials) == 1 and credentials[0] == self._allowed
        if not ok:
            self.num_denied += 1
        status, text = (b"200", b"OK") if ok else (b"400", b"not a member of this cluster")
        return [b"1.0", request_id, status, text, b"", b""]

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop_tx.send(b"")
        self._thread.join(10)
        self._stop_tx.close(0)
        self._thread = None
