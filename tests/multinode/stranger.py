"""A process without the cluster's key tries the cluster's sockets (run on a test host).

    python -m tests.multinode.stranger '{"targets": {...}, "server_key": "...", "member": null}'

targets: name -> {"endpoint": "tcp://...", "type": "DEALER" | "PUSH"} (the socket type that
talks to it). Each target is tried three ways: plain zmq (NULL), CURVE with a key pair of
its own that knows the server's public key, and PLAIN with a guessed password. Each try
watches its socket's handshake events, sends one message (a KV PULL, or a well-formed
command), and reads for a while. With "member" (the cluster's keys, the control run) the
target is tried with those instead. Prints one JSON line: name -> way -> {handshake, received}.
"""
from __future__ import annotations

import json
import sys
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from kv_transfer.curve import ZmqKeys, connect_data, connect_securely
from protos import worker_pb2 as wpb

WATCH_S = 2.0


def message(kind: str) -> list[bytes]:
    if kind == "DEALER":   # a KV pull for a transfer it made up
        return [b"PULL", json.dumps({"transfer_id": "stolen-0", "attempt": 1}).encode()]
    work = wpb.ToWorker(prefill=wpb.PrefillWork(req_id="injected", prompt_token_ids=[1, 2, 3]))
    return [work.SerializeToString()]


def attempt(endpoint: str, kind: str, setup) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER if kind == "DEALER" else zmq.PUSH)
    sock.linger = 0
    monitor = sock.get_monitor_socket()
    setup(sock)
    sock.connect(endpoint)
    try:
        sock.send_multipart(message(kind), flags=zmq.NOBLOCK)
    except zmq.Again:
        pass
    handshake, received, events = False, 0, []
    deadline = time.monotonic() + WATCH_S
    while time.monotonic() < deadline:
        if monitor.poll(50):
            event = recv_monitor_message(monitor)["event"]
            events.append(int(event))
            handshake = handshake or event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        if kind == "DEALER" and sock.poll(0):
            sock.recv_multipart()
            received += 1
    sock.disable_monitor()
    monitor.close(0)
    sock.close(0)
    return {"handshake": handshake, "received": received, "events": sorted(set(events))}


def main(spec: dict) -> dict:
    server_key = spec["server_key"].encode()
    own = zmq.curve_keypair()

    def null(sock):
        pass

    def curve(sock):
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = own[1], own[0], server_key

    def plain(sock):
        sock.plain_username, sock.plain_password = b"pdcluster", b"guessed"

    ways = {"null": null, "curve": curve, "plain": plain}
    if spec.get("member"):
        keys = ZmqKeys(**spec["member"])
        ways = {"member": lambda s: connect_securely(s, keys), "member_data": lambda s: connect_data(s, keys)}
    return {name: {way: attempt(t["endpoint"], t["type"], setup) for way, setup in ways.items()}
            for name, t in spec["targets"].items()}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
