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

KV bytes. Encrypting them costs more CPU than the wire they cross (4 MB zmq
frames between two test hosts: 0.7 GB/s through CURVE, 3.1 GB/s without;
docs/benchmarks.md), so by default a prefill worker sends them on a second
socket (`serve_data`), in the clear but closed to strangers all the same: its
ZAP check admits a PLAIN handshake only with a password derived from the
cluster's secret key (`ZmqKeys.data_password`), the bytes go only to the
receiver that asked for them over the CURVE channel (a random routing id it
named there), and what arrives on it only tells the sender that a member's
connection is up (zmq's probe), never a message it acts on. What this does
not hide is the KV (nor the password) from someone who can read the wire
between two nodes: `security.encrypt_kv` sends the bytes through CURVE too.
"""
from __future__ import annotations

import hashlib
import hmac
import threading
from dataclasses import dataclass

import zmq
from zmq.utils import z85

ZAP_ENDPOINT = "inproc://zeromq.zap.01"   # fixed by the ZAP spec (RFC 27), one per context
DOMAIN = b"pdcluster"
DATA_DOMAIN = b"pdcluster-kv-data"
DATA_USER = b"pdcluster"


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

    @property
    def data_password(self) -> bytes:
        """What a member presents on a KV data socket: derived from the secret key, never the key."""
        return hashlib.blake2b(self.secret.encode(), key=DATA_DOMAIN, digest_size=32).hexdigest().encode()


def connect_data(sock: zmq.Socket, keys: ZmqKeys) -> None:
    """Make `sock` a member's client of a KV data socket (`CurveGuard.serve_data`)."""
    sock.plain_username = DATA_USER
    sock.plain_password = keys.data_password


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
        self._data_password = keys.data_password
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

    def serve_data(self, sock: zmq.Socket) -> None:
        """Make `sock` a KV data server: PLAIN, admitting members only (see the module's doc)."""
        sock.plain_server = True
        sock.zap_domain = DATA_DOMAIN

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
        domain = request[2] if len(request) > 2 else b""
        mechanism = request[5] if len(request) > 5 else b""
        credentials = request[6:]
        if domain == DATA_DOMAIN:
            ok = (mechanism == b"PLAIN" and len(credentials) == 2 and credentials[0] == DATA_USER
                  and hmac.compare_digest(credentials[1], self._data_password))
        else:
            ok = mechanism == b"CURVE" and len(credentials) == 1 and hmac.compare_digest(credentials[0], self._allowed)
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
