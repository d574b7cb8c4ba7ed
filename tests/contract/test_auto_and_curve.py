"""Backend auto picks the way per pair; CurveZMQ keeps everyone without the cluster's key out.

Between two real processes on this machine, the pair is told whether it
shares a node (`node=` on both sides): one node copies zero copy out of the
sender's shared cache, two nodes take the bytes inline over zmq. With keys,
a process that lacks them reaches nothing: a plain zmq client and a CURVE
client with its own key pair (even one that knows the server's public key)
send a PULL for a live offer, and the lease never starts; the KV data socket
completes no handshake without the password derived from the cluster key.
"""
from __future__ import annotations

import time

import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from kv_transfer.curve import CurveGuard, ZmqKeys, connect_data, connect_securely
from kv_transfer.lease import LeaseState
from kv_transfer.messages import header
from tests.contract.harness import AUTO_ONE_NODE, AUTO_TWO_NODES, CURVE, make_layout, ok, variant_kwargs
from tests.contract.test_transfer_contract import running


@pytest.mark.parametrize("backend, via", [(AUTO_ONE_NODE, "shm"), (AUTO_TWO_NODES, "zmq")])
@pytest.mark.parametrize("stream", [False, True])
def test_auto_goes_zero_copy_on_one_node_and_inline_across(backend, via, stream):
    layout = make_layout(num_layers=4)
    with running(backend, layout) as pair:
        offer, src_ids = pair.offer("r", 45, stream=stream)
        assert offer.backend == "auto" and offer.node == "node-a"
        assert (offer.zero_copy is not None) == (not stream)   # what a same-node receiver copies at once
        dst_ids = pair.pull(offer)
        if stream:
            pair.sender.layers_ready([offer.transfer_id], None)
        pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
        result = pair.results[offer.transfer_id]
        assert ok(result) and result.via == via
        assert result.nbytes == 45 * layout.bytes_per_token
        assert torch.equal(pair.received(offer, dst_ids), pair.sent(offer, src_ids))
        pair.finish_request(offer, dst_ids)


def _stranger(endpoint: str, keys: ZmqKeys | None, tid: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    connect_securely(sock, keys)
    sock.connect(endpoint)
    sock.send_multipart([b"PULL", header({"transfer_id": tid, "attempt": 1})])
    return sock


def test_a_process_without_the_key_can_neither_pull_nor_start_a_lease():
    layout = make_layout(num_layers=2)
    with running(CURVE, layout) as pair:
        offer, src_ids = pair.offer("r", 33)
        server_public = variant_kwargs(CURVE)[1]["keys"].public   # the pair's cluster key
        mine = zmq.curve_keypair()
        impostor = ZmqKeys(mine[0].decode(), mine[1].decode())   # its own pair
        strangers = [_stranger(offer.endpoint, None, offer.transfer_id),          # plain zmq
                     _stranger(offer.endpoint, impostor, offer.transfer_id)]      # CURVE, not a member
        strangers[1].curve_serverkey = server_public.encode()   # it even knows the server's public key
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            pair.sender.pump(0.01)
            for s in strangers:
                assert not s.poll(0), "a process without the key got an answer"
        assert offer.transfer_id not in pair.ends   # the lease is still only offered: nothing reached it
        for s in strangers:
            s.close(0)
        dst_ids = pair.pull(offer)   # the member still gets its KV
        pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
        assert ok(pair.results[offer.transfer_id]) and pair.ends[offer.transfer_id].outcome is LeaseState.DONE
        assert torch.equal(pair.received(offer, dst_ids), pair.sent(offer, src_ids))
        pair.finish_request(offer, dst_ids)


def _handshake(endpoint: str, setup) -> bool:
    """Whether a DEALER set up by `setup` completes its handshake with `endpoint` within 2 s."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    monitor = sock.get_monitor_socket()
    setup(sock)
    sock.connect(endpoint)
    ok, deadline = False, time.monotonic() + 2.0
    while not ok and time.monotonic() < deadline:
        if monitor.poll(50):
            ok = recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    sock.disable_monitor()
    monitor.close(0)
    sock.close(0)
    return ok


def test_the_kv_data_socket_admits_members_only():
    layout = make_layout(num_layers=2)
    keys = variant_kwargs(CURVE)[1]["keys"]
    with running(CURVE, layout) as pair:
        offer, _ = pair.offer("r", 9)
        assert offer.data_endpoint and offer.data_endpoint != offer.endpoint

        def guessed(sock):
            sock.plain_username, sock.plain_password = b"pdcluster", b"guessed"
        assert not _handshake(offer.data_endpoint, lambda s: None)                # plain zmq
        assert not _handshake(offer.data_endpoint, guessed)                       # a guessed password
        assert not _handshake(offer.endpoint, lambda s: connect_data(s, keys))   # the password opens no CURVE socket
        assert _handshake(offer.data_endpoint, lambda s: connect_data(s, keys))  # a member
        pair.sender.abort(offer.transfer_id)
        pair.drive(lambda: offer.transfer_id in pair.ends)


def test_the_guard_admits_members_only_and_counts_the_others():
    keys = ZmqKeys.generate()
    assert keys.secret not in repr(keys)
    ctx = zmq.Context()
    guard = CurveGuard(ctx, keys)
    server = ctx.socket(zmq.PULL)
    server.linger = 0
    guard.serve(server)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    other = zmq.curve_keypair()
    clients = []
    for k in (keys, None, ZmqKeys(other[0].decode(), other[1].decode())):
        c = ctx.socket(zmq.PUSH)
        c.linger = 0
        connect_securely(c, k)
        if k is not None:
            c.curve_serverkey = keys.public.encode()
        c.connect(f"tcp://127.0.0.1:{port}")
        c.send(b"member" if k is keys else b"stranger")
        clients.append(c)
    got = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if server.poll(50):
            got.append(server.recv())
    assert got == [b"member"]
    assert guard.num_denied >= 1   # the CURVE stranger reached the handler and was turned away
    for c in clients:
        c.close(0)
    server.close(0)
    guard.close()
    ctx.term()
