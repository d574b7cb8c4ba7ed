"""Workers in one process: a failed or late KV transfer (recompute, reprefill, fail) keeps the tokens.

A prefill and a decode worker stepped by hand as the router would, against the
engine on the same tiny model: the harness is tests/worker_pair.py.
"""
from __future__ import annotations

import dataclasses
import pickle
import time

import pytest

from kv_transfer.faults import FaultInjector, FaultSpec
from tests.worker_pair import BACKENDS, expected_tokens, params_of, prompt_ids, sp

pytestmark = pytest.mark.slow     # loads a (tiny) model into three engines per test


# -- a failed transfer is recomputed at decode, with the same tokens ----------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cause", ["lease-expired", "aborted-at-prefill", "pull-cannot-start"])
def test_failed_transfer_recomputes_with_identical_tokens(make_pair, oracle, backend, cause):
    lengths = [5, 12, 21]
    prompts = [prompt_ids(n, seed=60 + n) for n in lengths]
    pair = make_pair(backend=backend, lease_ttl_s=0.05, forward=False)
    ids = [f"f{i}" for i in range(len(prompts))]
    for r, prompt in zip(ids, prompts):
        pair.submit(r, prompt, sp(8))
    pair.step_prefill()
    assert set(pair.done) == set(ids)
    if cause == "lease-expired":
        time.sleep(0.15)                    # past the TTL before decode asks
        for r in ids:
            pair.forward(r)
    elif cause == "aborted-at-prefill":
        for r in ids:
            pair.prefill.abort(r, time.monotonic())
            pair.forward(r)
        assert pair.prefill.load().num_leases == 0
    else:   # an offer decode cannot even start pulling (another backend's)
        for r in ids:
            offer = pickle.loads(pair.done[r].offer)
            bad = dataclasses.replace(offer, backend="zmq" if offer.backend == "shm" else "shm")
            pair.forward(r, offer=pickle.dumps(bad))
    pair.forward_auto = True
    pair.run_to_end(ids)
    assert pair.failed == {}
    for r, prompt in zip(ids, prompts):
        assert pair.tokens[r] == expected_tokens(oracle, [prompt], params_of(sp(8)))[0], r
        assert pair.finish[r] == "length"
    pair.assert_all_free()
    stats = pair.prefill.sender.leases.stats()
    assert stats.num_done == 0           # no lease ended in a successful hand-off
    if cause == "lease-expired":
        assert stats.num_expired + stats.num_failed == len(ids)
    if cause == "pull-cannot-start":
        # decode gives the offer back (ABORT), unless the 50 ms TTL ran out first
        assert stats.num_aborted + stats.num_expired == len(ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pull_that_cannot_start_aborts_the_prefill_lease_at_once(make_pair, oracle, backend):
    prompt = prompt_ids(10, seed=70)
    pair = make_pair(backend=backend, lease_ttl_s=30.0, forward=False)
    pair.submit("r", prompt, sp(5))
    pair.step_prefill()
    offer = pickle.loads(pair.done["r"].offer)
    bad = dataclasses.replace(offer, backend="zmq" if offer.backend == "shm" else "shm")
    pair.forward("r", offer=pickle.dumps(bad))
    start = time.monotonic()
    pair.run_until(lambda: pair.prefill.load().num_leases == 0, "the prefill lease to end", timeout_s=5)
    assert time.monotonic() - start < 2.0, "the lease ended by its TTL, not by an ABORT"
    assert pair.prefill.sender.leases.stats().num_aborted == 1
    pair.run_to_end(["r"])
    assert pair.tokens["r"] == expected_tokens(oracle, [prompt], params_of(sp(5)))[0]   # recomputed at decode
    pair.assert_all_free()


@pytest.mark.parametrize("policy", ["recompute", "reprefill", "fail"])
@pytest.mark.parametrize("cause", ["pull-cannot-start", "corrupted"])
def test_a_failed_pull_follows_on_failure_and_ends_the_live_lease_at_once(make_pair, oracle, policy, cause):
    """transfer.on_failure decides what becomes of the request; whichever, the live prefill
    side hears of it at once (the offer given back, or ACK ok=False after the retries) and
    frees the blocks long before its lease's TTL."""
    prompt = prompt_ids(11, seed=75)
    pair = make_pair(backend="shm-copy" if cause == "corrupted" else "zmq", lease_ttl_s=30.0, forward=False,
                     on_failure=policy)
    pair.submit("r", prompt, sp(6))
    pair.step_prefill()
    if cause == "corrupted":   # every reply: the checksum catches it, each of the 3 attempts
        pair.prefill.sender._faults = FaultInjector(FaultSpec(corrupt_prob=1.0))
        pair.forward("r")
    else:
        offer = pickle.loads(pair.done["r"].offer)
        pair.forward("r", offer=pickle.dumps(dataclasses.replace(offer, backend="shm")))
    start = time.monotonic()
    pair.run_until(lambda: pair.prefill.load().num_leases == 0, "the prefill lease to end", timeout_s=10)
    assert time.monotonic() - start < 2.0, "the lease ended by its TTL"
    stats = pair.prefill.sender.leases.stats()
    assert (stats.num_aborted, stats.num_failed) == ((1, 0) if cause == "pull-cannot-start" else (0, 1))
    pair.run_to_end(["r"])
    failed = [f for m in pair.decode_out for f in m.failed]
    if policy == "recompute":
        assert not failed and pair.tokens["r"] == expected_tokens(oracle, [prompt], params_of(sp(6)))[0]
    else:
        assert [(f.req_id, f.retry) for f in failed] == [("r", policy == "reprefill")]
        assert pair.tokens["r"] == [pair.done["r"].first_token_id]
    assert pair.decode.stats()["num_failed_pulls"] == 1
    pair.assert_all_free()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pull_is_answered_during_the_next_prefill_forward(make_pair, oracle, backend):
    """A decode worker's PULL that reaches the prefill worker while it runs another
    batch is answered between layers (no stream_layers), not after the batch."""
    first, long = prompt_ids(10, seed=80), prompt_ids(60, seed=81)
    pair = make_pair(backend=backend, forward=False)
    pair.submit("a", first, sp(4))
    pair.step_prefill()
    pair.forward("a")
    pair.submit("b", long, sp(4))
    runner = pair.prefill.runner
    plain_execute = runner.execute
    layers_after_pull = []

    def execute(plan, on_layer=None):
        assert on_layer is not None, "the prefill worker gave its forward no per-layer hook"

        def hook(i):
            if i == 0:
                pair.step_decode()            # decode admits "a" and sends its PULL now
            else:                             # a real layer takes this long on a real model
                layers_after_pull.append(i)
                time.sleep(0.05)
            on_layer(i)
        return plain_execute(plan, on_layer=hook)

    runner.execute = execute
    try:
        pair.step_prefill()                   # b's forward: a's PULL arrives inside it
    finally:
        runner.execute = plain_execute
    assert layers_after_pull and "b" in pair.done
    # a's KV lands without another prefill step
    deadline = time.monotonic() + 5.0
    while pair.decode._pulls and time.monotonic() < deadline:
        pair.step_decode()
        time.sleep(0.001)
    assert not pair.decode._pulls, "the pull waited for the prefill worker's next step"
    pair.forward("b")
    pair.run_to_end(["a", "b"])
    expected = expected_tokens(oracle, [first, long], params_of(sp(4)))
    assert [pair.tokens["a"], pair.tokens["b"]] == expected
    pair.assert_all_free()


