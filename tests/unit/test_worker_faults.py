"""A worker process that dies mid-request, at each fault point, and what the decode side makes of it.

Each fault point (`faults.die_at`, test-only) is exercised on a real process
(`tests/worker_process.py`: the worker built by `build_worker` and served by
`WorkerHost`, as in an actor, without Ray) which must die by SIGKILL exactly
there: the test plays the router over the worker's sockets and checks what
reached it before the death. Where a peer worker is needed it runs here,
in-process, stepped by hand.

Then the decode side of a dead prefill instance: the offers of a prefill
process killed right after it sent them (`prefill.leased`) go to decode
workers here with `peer_lost`, under each `transfer.on_failure` policy, with
the request pending, pulling, or arriving after the news. The oracle is the
engine's `LLM.generate` (tests/worker_pair.py). Every test ends with no
block held by a live worker, no lease left, and the dead process's shared
memory gone.
"""
from __future__ import annotations

import os
import time

import pytest
import zmq

from cluster.config import load_config
from cluster.worker_factory import build_worker
from decode_worker.worker import load_offer
from protos import worker_pb2 as wpb
from tests.worker_pair import (BLOCK_SIZE, expected_tokens, gb_for, oracle, params_of, prompt_ids, sp,  # noqa: F401
                               tiny_dir)
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.slow     # a worker process per test (~5 s to start on 2 cores)


def _overrides(model_dir: str, backend: str = "zmq", faults: dict | None = None, on_failure: str = "recompute",
               stream_layers: bool = False, mode: str | None = None) -> dict:
    pool = {"block_size": BLOCK_SIZE, "kv_cache_memory_gb": gb_for(model_dir, 64), "num_threads": 1}
    out = {"model": {"path": model_dir, "dtype": "float32"}, "prefill": pool, "decode": pool, "colocated": pool,
           "transfer": {"backend": "zmq" if backend == "zmq" else "shm", "checksum": False, "compress": None,
                        "stream_layers": stream_layers, "on_failure": on_failure}}
    if faults:
        out["faults"] = faults
    if mode:
        out["mode"] = mode
    return out


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def spawn(ctx):
    procs: list[WorkerProcess] = []

    def start(role: str, name: str, overrides: dict) -> WorkerProcess:
        procs.append(WorkerProcess(ctx, role, name, overrides))
        return procs[-1]

    yield start
    for p in procs:
        p.close()


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


def _prefill_work(req_id: str, prompt: list[int], sampling) -> wpb.ToWorker:
    return wpb.ToWorker(prefill=wpb.PrefillWork(req_id=req_id, prompt_token_ids=prompt, sampling=sampling))


def _decode_work(done: wpb.PrefillDone, prompt: list[int], sampling) -> wpb.DecodeWork:
    """The router's `_send_decode`: the prompt, the first token and the offer, opaque."""
    return wpb.DecodeWork(req_id=done.req_id, prompt_token_ids=prompt, sampling=sampling,
                          first_token_id=done.first_token_id, offer=done.offer)


def _tokens(msgs: list[wpb.FromWorker], req_id: str) -> list[int]:
    return [t for m in msgs for x in list(m.prefilled) + list(m.tokens) if x.req_id == req_id
            for t in ([x.first_token_id] if isinstance(x, wpb.PrefillDone) else list(x.token_ids))]


def _live_prefill(model_dir: str):
    """A prefill worker here, for a decode process to pull from."""
    return build_worker("prefill", "prefill-live", load_config(None, _overrides(model_dir)), model_dir)


def _prefill_here(prefill, req_id: str, prompt: list[int], sampling) -> wpb.PrefillDone:
    prefill.handle(_prefill_work(req_id, prompt, sampling), time.monotonic())
    out = prefill.step(time.monotonic())
    (done,) = out.prefilled
    assert done.offer
    return done


# -- the fault points, one process each ----------------------------------------------------------
def test_prefill_queued_dies_when_the_nth_request_is_queued(tiny_dir, spawn):
    w = spawn("prefill", "prefill-0", _overrides(tiny_dir, faults={"die_at": "prefill.queued", "after": 2}))
    w.send(prefill=wpb.PrefillWork(req_id="a", prompt_token_ids=prompt_ids(6, seed=1), sampling=sp(4)))
    w.receive(lambda: any(m.prefilled for m in w.received))      # the first is served as usual
    w.send(prefill=wpb.PrefillWork(req_id="b", prompt_token_ids=prompt_ids(7, seed=2), sampling=sp(4)))
    w.wait_killed()
    assert [d.req_id for m in w.news() for d in m.prefilled] == ["a"]
    assert all(not m.failed for m in w.received)


def test_prefill_forward_dies_inside_the_forward(tiny_dir, spawn):
    """Streaming layers, its offer goes out before the forward: the router saw the offer,
    never the PrefillDone."""
    w = spawn("prefill", "prefill-0", _overrides(tiny_dir, faults={"die_at": "prefill.forward"}, stream_layers=True))
    w.send(prefill=wpb.PrefillWork(req_id="a", prompt_token_ids=prompt_ids(9, seed=3), sampling=sp(4)))
    w.wait_killed()
    news = w.news()
    assert [o.req_id for m in news for o in m.offered] == ["a"]
    assert not any(m.prefilled or m.failed for m in news)


PROMPTS = {"g": (prompt_ids(13, seed=4), sp(8)),                                   # greedy
           "s": (prompt_ids(10, seed=5), sp(8, temperature=0.9, top_p=0.95, seed=77))}   # seeded


@pytest.fixture(scope="module", params=["zmq", "shm-zero-copy"])
def dead_prefill(request, tiny_dir):
    """A prefill process killed right after it sent the PrefillDone of its second offer
    (`prefill.leased`): its offers, and the endpoint they name, are a dead sender's."""
    backend, segment = request.param, None
    ctx = zmq.Context()
    w = WorkerProcess(ctx, "prefill", "prefill-0",
                      _overrides(tiny_dir, backend, faults={"die_at": "prefill.leased", "after": 2}))
    try:
        for req_id, (prompt, sampling) in PROMPTS.items():   # one after the other: a batch each
            w.send(prefill=wpb.PrefillWork(req_id=req_id, prompt_token_ids=prompt, sampling=sampling))
            w.receive(lambda r=req_id: any(d.req_id == r for m in w.received for d in m.prefilled)
                      or w.proc.poll() is not None)
        w.wait_killed()
        dones = {d.req_id: d for m in w.received for d in m.prefilled}
        offers = {r: load_offer(d.offer) for r, d in dones.items()}
        segment = offers["g"].zero_copy["name"] if backend == "shm-zero-copy" else None
        yield backend, dones, offers, w
    finally:
        w.close()
        ctx.term()
    if segment is not None:   # its own resource tracker unlinks the dead process's cache
        deadline = time.monotonic() + 10
        while segment in _segments() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert segment not in _segments(), "the dead prefill's shared cache was left in /dev/shm"


def test_prefill_leased_dies_once_its_offers_are_sent(dead_prefill):
    backend, dones, offers, w = dead_prefill
    assert w.proc.returncode == -9
    assert list(dones) == ["g", "s"] and all(d.offer and not d.finish_reason for d in dones.values())
    assert len({o.endpoint for o in offers.values()}) == 1
    # the second PrefillDone was the last news: the process died right after sending it
    assert w.news()[-1].prefilled[-1].req_id == "s"
    assert all(o.zero_copy is not None for o in offers.values()) == (backend == "shm-zero-copy")


@pytest.mark.parametrize("policy", ["recompute", "reprefill", "fail"])
@pytest.mark.parametrize("state", ["pending", "pulling", "early", "late"])
def test_a_dead_prefill_s_requests_follow_transfer_on_failure(tiny_dir, oracle, dead_prefill, policy, state):
    """When `peer_lost` comes, the request is pending at decode (not admitted), pulling (admitted,
    pull started), prefetched (an early pull, stream_layers' path: dropped, and its DecodeWork
    comes after), or not here yet (its DecodeWork comes after the news)."""
    backend, dones, offers, _ = dead_prefill
    cfg = load_config(None, _overrides(tiny_dir, backend, on_failure=policy))
    decode = build_worker("decode", "decode-0", cfg, tiny_dir)
    endpoint = offers["g"].endpoint
    works = [wpb.ToWorker(decode=_decode_work(dones[r], p, sp)) for r, (p, sp) in PROMPTS.items()]
    msgs: list[wpb.FromWorker] = []
    try:
        if state == "early":
            assert all(decode.prefetch(d.offer, time.monotonic()) for d in dones.values())
            assert len(decode._early) == 2 and decode.blocks.num_free_blocks < decode.blocks.num_blocks
        if state in ("pending", "pulling"):
            for work in works:
                decode.handle(work, time.monotonic())
        if state == "pulling":
            decode._admit(time.monotonic())
            assert len(decode._pulls) == 2 and decode.blocks.num_free_blocks < decode.blocks.num_blocks
        start = time.monotonic()
        decode.handle(wpb.ToWorker(peer_lost=wpb.PeerLost(endpoint=endpoint)), time.monotonic())
        if state in ("early", "late"):
            assert decode.step(time.monotonic()) is None   # early pulls dropped, nothing to tell
            assert not decode._early and decode.blocks.num_free_blocks == decode.blocks.num_blocks
            for work in works:
                decode.handle(work, time.monotonic())
        deadline = time.monotonic() + 60
        while not decode.is_idle() or not msgs:
            assert time.monotonic() < deadline, decode.load()
            out = decode.step(time.monotonic())
            if out is not None:
                msgs.append(out)
        failed = {f.req_id: f for m in msgs for f in m.failed}
        if policy == "recompute":   # slower, never lost: the engine's tokens after the first
            assert not failed
            for req_id, (prompt, sampling) in PROMPTS.items():
                want = expected_tokens(oracle, [prompt], params_of(sampling))[0]
                assert [dones[req_id].first_token_id] + _tokens(msgs, req_id) == want, req_id
        else:
            assert set(failed) == set(PROMPTS) and not any(m.tokens for m in msgs)
            assert all(f.retry == (policy == "reprefill") for f in failed.values())
            assert all("died" in f.error for f in failed.values())
            # at once: no pull waited for the receiver's 10 s timeouts
            assert time.monotonic() - start < 5.0
        assert decode.stats()["num_failed_pulls"] == 2
        assert decode.blocks.num_free_blocks == decode.blocks.num_blocks
        assert not decode.receiver._pending and decode.load().num_waiting == 0
    finally:
        decode.close()


def test_decode_pull_dies_with_a_pull_started(tiny_dir, oracle, spawn):
    prefill = _live_prefill(tiny_dir)
    try:
        w = spawn("decode", "decode-0", _overrides(tiny_dir, faults={"die_at": "decode.pull"}))
        prompt, sampling = prompt_ids(11, seed=6), sp(6)
        done = _prefill_here(prefill, "r", prompt, sampling)
        w.send(decode=_decode_work(done, prompt, sampling))
        w.wait_killed(between=lambda: prefill.step(time.monotonic()))
        assert not w.news()
        # the lease is held for a pull that will never end: the router aborts it at prefill
        lease = prefill.sender.leases.get(load_offer(done.offer).transfer_id)
        assert lease is not None and prefill.load().num_leases == 1
        prefill.handle(wpb.ToWorker(abort=wpb.Abort(req_id="r")), time.monotonic())
        prefill.step(time.monotonic())
        assert prefill.is_idle() and prefill.blocks.num_free_blocks == prefill.blocks.num_blocks
        assert prefill.sender.leases.stats().num_aborted == 1
    finally:
        prefill.close()


def test_decode_stream_dies_right_after_the_nth_tokens_are_sent(tiny_dir, oracle, spawn):
    prefill = _live_prefill(tiny_dir)
    try:
        w = spawn("decode", "decode-0", _overrides(tiny_dir, faults={"die_at": "decode.stream", "after": 3}))
        prompt, sampling = prompt_ids(12, seed=7), sp(9)
        done = _prefill_here(prefill, "r", prompt, sampling)
        w.send(decode=_decode_work(done, prompt, sampling))
        w.wait_killed(between=lambda: prefill.step(time.monotonic()))
        streamed = [t for m in w.news() for t in m.tokens]
        assert len(streamed) == 3 and not any(t.finish_reason for t in streamed)
        want = expected_tokens(oracle, [prompt], params_of(sampling))[0]
        assert [done.first_token_id] + _tokens(w.received, "r") == want[:4]
        # its KV had been pulled and acknowledged before: the prefill side holds nothing
        deadline = time.monotonic() + 10
        while not prefill.is_idle() and time.monotonic() < deadline:
            prefill.step(time.monotonic())
        assert prefill.sender.leases.stats().num_done == 1
        assert prefill.blocks.num_free_blocks == prefill.blocks.num_blocks
    finally:
        prefill.close()


def test_colocated_stream_dies_right_after_the_nth_tokens_are_sent(tiny_dir, oracle, spawn):
    w = spawn("colocated", "colocated-0", _overrides(tiny_dir, mode="colocated",
                                                       faults={"die_at": "colocated.stream", "after": 2}))
    prompt, sampling = prompt_ids(10, seed=8), sp(9, temperature=0.9, seed=5)
    w.send(prefill=wpb.PrefillWork(req_id="r", prompt_token_ids=prompt, sampling=sampling))
    w.wait_killed()
    news = w.news()
    assert [d.req_id for m in news for d in m.prefilled] == ["r"]
    assert len([t for m in news for t in m.tokens]) == 2
    assert _tokens(w.received, "r") == expected_tokens(oracle, [prompt], params_of(sampling))[0][:3]


def test_a_fault_for_another_instance_does_not_fire(tiny_dir, oracle, spawn):
    w = spawn("colocated", "colocated-1", _overrides(tiny_dir, mode="colocated", faults={
        "die_at": "colocated.stream", "instance": "colocated-0"}))
    prompt, sampling = prompt_ids(8, seed=9), sp(4)
    w.send(prefill=wpb.PrefillWork(req_id="r", prompt_token_ids=prompt, sampling=sampling))
    w.receive(lambda: any(t.finish_reason for m in w.received for t in m.tokens))
    assert _tokens(w.received, "r") == expected_tokens(oracle, [prompt], params_of(sampling))[0]
    w.receive(lambda: w.received[-1].load.num_free_blocks == w.received[-1].load.num_blocks)
    assert w.proc.poll() is None
