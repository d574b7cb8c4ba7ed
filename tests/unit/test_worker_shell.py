"""The one worker shell: prefill, decode and colocated workers share its core, and its host beats on.

Every kind is built by `cluster.worker_factory.build_worker` on the tiny model
of tests/worker_pair.py and stepped by hand: the outbox, failures,
flushes, the load snapshot, step timing (a `faults.step_delay_s` step counts
in it), stats and close behave the same whatever the kind, because they are
one code. Then `WorkerHost`'s heartbeats: they come from their own thread, so
a step longer than the heartbeat interval does not silence the instance.
"""
from __future__ import annotations

import time

import pytest
import zmq

from cluster.config import load_config
from cluster.worker_factory import build_worker
from cluster.worker_host import HEARTBEAT_S, WorkerHost
from colocated_worker.worker import ColocatedWorker
from decode_worker.worker import DecodeWorker
from prefill_worker.worker import PrefillWorker
from protos import worker_pb2 as wpb
from tests.helpers import save_tiny_model
from tests.worker_pair import BLOCK_SIZE, VOCAB, gb_for, prompt_ids, sp
from worker_shell.base import WorkerShell

pytestmark = pytest.mark.slow

SHARED = ("handle", "_fail", "_stream", "_flush", "_timed", "load", "close", "die_due", "die")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-shell")
    save_tiny_model(str(path), arch="llama", seed=3, vocab_size=VOCAB)
    return str(path)


def _config(model_dir: str, **faults):
    pool = {"block_size": BLOCK_SIZE, "kv_cache_memory_gb": gb_for(model_dir, 32), "num_threads": 1}
    return load_config(None, {"model": {"path": model_dir, "dtype": "float32"}, "prefill": pool, "decode": pool,
                              "colocated": pool, "transfer": {"backend": "zmq"}, "faults": faults})


def _cannot_take(role: str) -> wpb.ToWorker:
    """A request's command this kind does not take."""
    if role == "decode":
        return wpb.ToWorker(prefill=wpb.PrefillWork(req_id="x"))
    return wpb.ToWorker(decode=wpb.DecodeWork(req_id="x"))


def _run_to_end(worker, req_id: str, out: list[wpb.FromWorker], also=None) -> None:
    deadline = time.monotonic() + 30
    while not any(t.req_id == req_id and t.finish_reason for m in out for t in m.tokens):
        assert time.monotonic() < deadline
        if also is not None:
            also()
        msg = worker.step(time.monotonic())
        if msg is not None:
            out.append(msg)


def test_all_three_kinds_share_one_shell(tiny_dir):
    cfg = _config(tiny_dir, step_delay_s=0.02)
    prefill = build_worker("prefill", "prefill-0", cfg, tiny_dir)
    decode = build_worker("decode", "decode-0", cfg, tiny_dir)
    colocated = build_worker("colocated", "colocated-0", cfg, tiny_dir)
    workers = {"prefill": prefill, "decode": decode, "colocated": colocated}
    assert (type(prefill), type(decode), type(colocated)) == (PrefillWorker, DecodeWorker, ColocatedWorker)
    try:
        for role, w in workers.items():
            assert isinstance(w, WorkerShell) and w.role == role
            for attr in SHARED:   # written once, in the shell
                assert getattr(type(w), attr) is getattr(WorkerShell, attr), (role, attr)
            # nothing to say: no message; a snapshot of an empty instance
            assert w.step(time.monotonic()) is None
            load = w.load()
            assert (load.num_free_blocks, load.num_blocks, load.num_steps, load.mean_step_s) == (32, 32, 0, 0.0)
            assert w.stats()["role"] == role
            assert {k: w.stats()[k] for k in ("num_free_blocks", "num_blocks", "idle", "num_steps")} == \
                {"num_free_blocks": 32, "num_blocks": 32, "idle": True, "num_steps": 0}
            # a command it does not take fails that request, in the next flush, once
            w.handle(_cannot_take(role), time.monotonic())
            w.handle(wpb.ToWorker(), time.monotonic())
            out = w.step(time.monotonic())
            assert out.instance == w.name and out.load.num_blocks == 32
            assert [(f.req_id, f.retry) for f in out.failed] == [("x", False), ("", False)]
            assert f"a {role} worker cannot take" in out.failed[0].error
            assert w.step(time.monotonic()) is None
            if role != "decode":   # a command without a request is only logged
                w.handle(wpb.ToWorker(peer_lost=wpb.PeerLost(endpoint="tcp://127.0.0.1:1")), time.monotonic())
                assert w.step(time.monotonic()) is None

        # one request through each kind: steps are counted and timed (step_delay_s inside)
        prompt, sampling = prompt_ids(9, seed=1), sp(4)
        colocated.handle(wpb.ToWorker(prefill=wpb.PrefillWork(req_id="c", prompt_token_ids=prompt,
                                                              sampling=sampling)), time.monotonic())
        _run_to_end(colocated, "c", [])
        prefill.handle(wpb.ToWorker(prefill=wpb.PrefillWork(req_id="d", prompt_token_ids=prompt,
                                                            sampling=sampling)), time.monotonic())
        (done,) = prefill.step(time.monotonic()).prefilled
        decode.handle(wpb.ToWorker(decode=wpb.DecodeWork(req_id="d", prompt_token_ids=prompt, sampling=sampling,
                                                         first_token_id=done.first_token_id, offer=done.offer)),
                      time.monotonic())
        out: list[wpb.FromWorker] = []
        _run_to_end(decode, "d", out, also=lambda: prefill.step(time.monotonic()))
        assert [t for m in out for x in m.tokens for t in x.token_ids] and not any(m.failed for m in out)
        while not prefill.is_idle():
            prefill.step(time.monotonic())
        for role, w in workers.items():
            load, stats = w.load(), w.stats()
            assert load.num_steps == stats["num_steps"] >= 1 and load.mean_step_s >= 0.02, role
            assert load.num_free_blocks == load.num_blocks and stats["idle"], role
        assert decode.stats()["num_prefetched"] == 0 and decode.stats()["num_failed_pulls"] == 0
    finally:
        for w in workers.values():
            w.close()
    for role, w in workers.items():   # on_close ran: the runner let go of its cache
        assert w.runner.kv_cache.data is None, role


def test_heartbeats_keep_coming_during_a_step_longer_than_their_interval(tiny_dir):
    delay = 2.5 * HEARTBEAT_S
    worker = build_worker("colocated", "colocated-0", _config(tiny_dir, step_delay_s=delay), tiny_dir)
    ctx = zmq.Context()
    router = ctx.socket(zmq.PULL)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    host = WorkerHost(worker, f"tcp://127.0.0.1:{port}")
    commands = ctx.socket(zmq.PUSH)
    commands.setsockopt(zmq.LINGER, 0)
    commands.connect(host.command_endpoint)
    host.start()
    got: list[tuple[float, wpb.FromWorker]] = []
    try:
        assert router.poll(5000), "no first heartbeat"
        got.append((time.monotonic(), wpb.FromWorker.FromString(router.recv())))
        sent = time.monotonic()
        commands.send(wpb.ToWorker(prefill=wpb.PrefillWork(req_id="r", prompt_token_ids=prompt_ids(6, seed=2),
                                                           sampling=sp(1))).SerializeToString())
        while not any(m.prefilled for _, m in got):
            assert router.poll(int(3 * delay * 1000)), f"silent for {3 * delay}s"
            got.append((time.monotonic(), wpb.FromWorker.FromString(router.recv())))
    finally:
        host.stop()
        commands.close(0)
        router.close(0)
        ctx.term()
    done_at, done = got[-1]
    assert done_at - sent >= delay                        # one step, made that long
    during = [t for t, m in got if sent < t < done_at]
    assert len(during) >= 2, "heartbeats stopped while the step ran"
    times = [t for t, _ in got]
    assert max(b - a for a, b in zip(times, times[1:])) < HEARTBEAT_S + 0.5
    assert all(not (m.prefilled or m.tokens or m.failed) and m.instance == "colocated-0" for _, m in got[:-1])
    # the step's own message still carries the snapshot taken after it
    assert done.prefilled[0].finish_reason == "length" and done.load.num_steps == 1
    assert done.load.mean_step_s >= delay and done.load.num_free_blocks == done.load.num_blocks
