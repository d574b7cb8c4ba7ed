"""Workers in one process: requests wait for blocks and batch slots, never preempted at admission.

A prefill and a decode worker stepped by hand as the router would, against the
engine on the same tiny model: the harness is tests/worker_pair.py.
"""
from __future__ import annotations

import pickle
import time

import pytest

from tests.worker_pair import BACKENDS, expected_tokens, params_of, prompt_ids, sp

pytestmark = pytest.mark.slow     # loads a (tiny) model into three engines per test


# -- waiting for room ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("short_of", ["blocks", "slots"])
def test_decode_request_waits_pending_until_room_frees(make_pair, oracle, backend, short_of):
    big, small = prompt_ids(25, seed=90), prompt_ids(10, seed=91)
    if short_of == "blocks":        # 8 blocks of 4: big holds 7 (prompt 25), small needs 3
        pair = make_pair(backend=backend, decode_blocks=8)
    else:                           # one batch slot
        pair = make_pair(backend=backend, decode_max_seqs=1)
    pair.submit("big", big, sp(6))       # 25 + 6 = 31 tokens: fits 8 blocks
    pair.submit("small", small, sp(5))
    pair.step_prefill()                   # both prefilled together, both forwarded, big first
    pair.decode._admit(time.monotonic())  # big admitted (pulling, not polled yet), small must wait
    assert pair.decode.load().num_waiting == 2
    pair.run_until(lambda: len(pair.tokens["big"]) >= 3, "big running")
    assert pair.tokens["small"] == [pair.done["small"].first_token_id]       # nothing decoded yet
    assert pair.decode.load().num_running == 1 and pair.decode.load().num_waiting == 1
    # small's KV is still held at prefill, not yet asked for
    small_lease = pair.prefill.sender.leases.get(pickle.loads(pair.done["small"].offer).transfer_id)
    assert small_lease is not None and small_lease.state.value == "offered"
    pair.run_to_end(["big", "small"])
    assert pair.failed == {}
    assert pair.tokens["big"] == expected_tokens(oracle, [big], params_of(sp(6)))[0]
    assert pair.tokens["small"] == expected_tokens(oracle, [small], params_of(sp(5)))[0]
    # small was pulled (not recomputed) once big had finished; the sender hears a zero-copy
    # pull's end a step or two after the receiver has the bytes
    pair.run_until(lambda: pair.prefill.sender.leases.stats().num_done == 2, "both leases done")
    assert pair.prefill.sender.leases.stats().num_failed == 0
    pair.assert_all_free()


def test_prefill_waits_for_blocks_held_under_a_lease(make_pair, oracle):
    big, small = prompt_ids(25, seed=92), prompt_ids(10, seed=93)
    pair = make_pair(backend="shm-zero-copy", prefill_blocks=8, forward=False)
    pair.submit("big", big, sp(6))
    pair.submit("small", small, sp(5))
    pair.step_prefill()
    assert set(pair.done) == {"big"}            # small's 3 blocks are not free: it waits
    load = pair.prefill.load()
    assert load.num_waiting == 1 and load.queued_prompt_tokens == len(small) and load.num_leases == 1
    for _ in range(5):
        pair.step_prefill()
    assert "small" not in pair.done and not pair.prefill.is_idle()
    pair.forward("big")                         # once decode pulled big's KV, small runs
    pair.forward_auto = True
    pair.run_to_end(["big", "small"])
    assert pair.tokens["big"] == expected_tokens(oracle, [big], params_of(sp(6)))[0]
    assert pair.tokens["small"] == expected_tokens(oracle, [small], params_of(sp(5)))[0]
    assert pair.done["small"].queue_s > 0
    pair.assert_all_free()


def test_admitted_requests_are_not_preempted_at_their_first_decode_step(make_pair, oracle):
    # block-aligned prompts: the first token needs a third block each; 5 blocks admit both (3 + 3 > 5 though)
    a, b = prompt_ids(8, seed=95), prompt_ids(8, seed=96)
    pair = make_pair(decode_blocks=5)
    pair.submit("a", a, sp(4))
    pair.submit("b", b, sp(4))
    preempted = []
    try:
        def check():
            preempted.extend(s.req_id for s in pair.decode.scheduler.waiting)
            return all(r in pair.finish or r in pair.failed for r in ("a", "b"))
        pair.run_until(check, "a and b to end")
        assert pair.tokens["a"] == expected_tokens(oracle, [a], params_of(sp(4)))[0]
        assert pair.tokens["b"] == expected_tokens(oracle, [b], params_of(sp(4)))[0]
        assert not preempted, f"{sorted(set(preempted))} were pulled, then preempted and recomputed"
    finally:
        pair.assert_all_free()


def test_an_offer_for_another_request_is_refused(make_pair, oracle):
    other = prompt_ids(9, seed=97)
    pair = make_pair(forward=False)
    pair.submit("other", other, sp(5))
    pair.step_prefill()
    pair.forward("thief", source="other", prompt_token_ids=prompt_ids(9, seed=98))
    try:
        pair.step_decode()
        assert "thief" in pair.failed
    finally:
        pair.abort("thief")
        pair.forward("other")
        pair.forward_auto = True
        pair.run_to_end(["other"])
        assert pair.tokens["other"] == expected_tokens(oracle, [other], params_of(sp(5)))[0]
        pair.assert_all_free()


def test_a_duplicate_decode_work_does_not_break_the_step(make_pair, oracle):
    a = prompt_ids(8, seed=99)
    pair = make_pair(forward=False)
    pair.submit("a", a, sp(200))      # long enough to be running still when the duplicate lands
    pair.step_prefill()
    pair.forward("a")
    pair.forward_auto = True
    pair.run_until(lambda: len(pair.tokens["a"]) >= 2, "a running")
    pair.forward("a")               # the same work again: its lease has ended, the pull fails
    try:
        pair.run_to_end(["a"])
        assert pair.tokens["a"] == expected_tokens(oracle, [a], params_of(sp(200)))[0]
    finally:
        pair.abort("a")
        pair.assert_all_free()


@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_the_decode_worker_mid_pull_frees_the_prefill_lease(make_pair, backend):
    """The receiver's close sends ABORT for its pulls and lingers until it is out: the
    lease ends by that ABORT at once, long before its TTL."""
    pair = make_pair(backend=backend, lease_ttl_s=30.0)
    pair.submit("r", prompt_ids(14, seed=100), sp(8))
    pair.step_prefill()
    pair.decode._admit(time.monotonic())     # pulling (a step would land a direct zero copy)
    assert pair.decode.load().num_waiting == 1 and pair.prefill.load().num_leases == 1
    pair.closed = True
    pair.decode.close()
    try:
        deadline = time.monotonic() + 2
        while pair.prefill.load().num_leases and time.monotonic() < deadline:
            pair.prefill.step(time.monotonic())
            time.sleep(0.002)
        assert pair.prefill.load().num_leases == 0
        assert pair.prefill.blocks.num_free_blocks == pair.prefill.blocks.num_blocks
        stats = pair.prefill.sender.leases.stats()
        assert stats.num_aborted == 1 and stats.num_done == 0
        assert pair.prefill.is_idle()
    finally:
        pair.prefill.close()


