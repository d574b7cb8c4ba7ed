"""Workers in one process: tokens, sampling, EOS, aborts in every state, bad work, scheduling.

A prefill and a decode worker stepped by hand as the router would, against the
engine on the same tiny model: the harness is tests/worker_pair.py.
"""
from __future__ import annotations

import pickle
import time

import pytest

from protos import worker_pb2 as wpb
from tests.worker_pair import BACKENDS, BLOCK_SIZE, VOCAB, expected_tokens, params_of, prompt_ids, req_tokens_in, sp

pytestmark = pytest.mark.slow     # loads a (tiny) model into three engines per test


# -- the tokens are the engine's --------------------------------------------------------------
@pytest.mark.parametrize("backend", ["zmq", "shm-zero-copy", "shm-copy"])
def test_batched_greedy_tokens_match_the_engine(make_pair, oracle, backend):
    # 1 partial block, 1 exact block, >2 blocks with a partial last one, exact 4 blocks, 10 blocks
    lengths = [3, 4, 9, 13, 16, 37]
    max_tokens = [6, 9, 5, 12, 7, 10]
    prompts = [prompt_ids(n, seed=i) for i, n in enumerate(lengths)]
    pair = make_pair(backend=backend)
    for i, (prompt, mt) in enumerate(zip(prompts, max_tokens)):
        pair.submit(f"r{i}", prompt, sp(mt))
    assert pair.prefill.load().queued_prompt_tokens == sum(lengths)

    out = pair.step_prefill()       # every prompt in one packed prefill step
    assert out is not None and len(out.prefilled) == len(prompts)
    assert pair.prefill.num_steps == 1
    held = sum(-(-n // BLOCK_SIZE) for n in lengths)
    assert out.load.num_leases == len(prompts)
    assert out.load.num_free_blocks == pair.prefill.blocks.num_blocks - held
    assert out.load.queued_prompt_tokens == 0

    pair.run_to_end([f"r{i}" for i in range(len(prompts))])
    assert pair.failed == {}
    want = expected_tokens(oracle, prompts, [params_of(sp(mt)) for mt in max_tokens])
    for i, prompt in enumerate(prompts):
        assert len(want[i]) == max_tokens[i]
        assert pair.tokens[f"r{i}"] == want[i], f"r{i} (prompt of {len(prompt)} tokens)"
        assert pair.finish[f"r{i}"] == "length"
        assert pair.transfer_s.get(f"r{i}", 0.0) > 0.0
    # the prefill side's leases ended by ACK, not by expiry
    pair.assert_all_free()
    stats = pair.prefill.sender.leases.stats()
    assert stats.num_done == len(prompts) and stats.num_expired == stats.num_failed == 0


def test_seeded_sampling_matches_the_engine_across_workers(make_pair, oracle):
    """The seed is mixed with the token's index: the split between workers changes nothing."""
    prompts = [prompt_ids(n, seed=10 + n) for n in (5, 11, 18)]
    msg = sp(9, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    want = expected_tokens(oracle, prompts, params_of(msg))
    pair = make_pair(backend="shm-zero-copy")
    for i, prompt in enumerate(prompts):
        pair.submit(f"s{i}", prompt, msg)
    pair.run_to_end(["s0", "s1", "s2"])
    assert [pair.tokens[f"s{i}"] for i in range(3)] == want
    pair.assert_all_free()


# -- finishing at prefill, EOS ------------------------------------------------------------------
def test_max_tokens_1_and_eos_finish_at_prefill_with_no_lease(make_pair, oracle):
    prompts = [prompt_ids(n, seed=20 + n) for n in (6, 9, 14)]
    firsts = [t[0] for t in expected_tokens(oracle, prompts, params_of(sp(1)))]
    pair = make_pair()
    # the first token of prompt 1 is this model's EOS from now on (on both workers)
    eos = firsts[1]
    pair.prefill.eos_token_ids = frozenset({eos})
    pair.decode.scheduler.eos_token_ids = frozenset({eos})
    pair.submit("one", prompts[0], sp(1))
    pair.submit("eos", prompts[1], sp(8, ignore_eos=False))
    pair.submit("keeps", prompts[2], sp(8, ignore_eos=True))
    pair.forward_auto = False
    out = pair.step_prefill()
    assert {d.req_id: d.finish_reason for d in out.prefilled} == {"one": "length", "eos": "eos", "keeps": ""}
    assert pair.done["one"].offer == b"" and pair.done["eos"].offer == b""
    assert pair.tokens["one"] == [firsts[0]] and pair.tokens["eos"] == [eos]
    # only "keeps" is under a lease, and only its prompt's blocks are held
    assert out.load.num_leases == 1
    assert pair.prefill.blocks.num_used_blocks == -(-len(prompts[2]) // BLOCK_SIZE)
    pair.forward("keeps")
    pair.forward_auto = True
    pair.run_to_end(["keeps"])
    assert pair.tokens["keeps"] == expected_tokens(oracle, [prompts[2]], params_of(sp(8)))[0]
    assert not req_tokens_in(pair.decode_out, "one") and not req_tokens_in(pair.decode_out, "eos")
    pair.assert_all_free()


def test_eos_at_decode_ends_the_request(make_pair, oracle):
    prompt = prompt_ids(10, seed=31)
    full = expected_tokens(oracle, [prompt], params_of(sp(12)))[0]
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    pair = make_pair()
    pair.prefill.eos_token_ids = frozenset({full[k]})
    pair.decode.scheduler.eos_token_ids = frozenset({full[k]})
    pair.submit("r", prompt, sp(12, ignore_eos=False))
    pair.run_to_end(["r"])
    assert pair.tokens["r"] == full[:k + 1]
    assert pair.finish["r"] == "eos"
    pair.assert_all_free()


# -- abort in every state -------------------------------------------------------------------------
STATES = ["prefill-waiting", "prefill-leased", "decode-pending", "decode-pulling", "decode-running"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state", STATES)
def test_abort_in_every_state_frees_every_block(make_pair, oracle, backend, state):
    victim, other = prompt_ids(13, seed=41), prompt_ids(7, seed=42)
    pair = make_pair(backend=backend, forward=False)
    pair.submit("other", other, sp(6))          # a bystander that must be served unharmed
    pair.submit("v", victim, sp(20))
    d_total, p_total = pair.decode.blocks.num_blocks, pair.prefill.blocks.num_blocks

    if state == "prefill-waiting":
        assert pair.prefill.load().num_waiting == 2
        pair.abort("v")
        assert pair.prefill.load().queued_prompt_tokens == len(other)
        pair.step_prefill()
        assert "v" not in pair.done
        pair.forward("other")
    else:
        pair.step_prefill()
        pair.forward("other")
        assert pair.prefill.load().num_leases == 2
        if state == "prefill-leased":
            pair.abort("v")          # the router aborts everywhere; decode never heard of it
            assert pair.prefill.load().num_leases == 1
            assert pair.prefill.blocks.num_used_blocks == -(-len(other) // BLOCK_SIZE)
        elif state == "decode-pending":
            pair.forward("v")
            assert pair.decode.load().num_waiting == 2          # both pending, nothing allocated
            assert pair.decode.blocks.num_free_blocks == d_total
            pair.abort("v")
        elif state == "decode-pulling":
            pair.forward("v")
            # admitted, not polled: blocks allocated, pull started (a direct zero copy lands
            # at the step's poll, so a whole step would already have it running)
            pair.decode._admit(time.monotonic())
            assert pair.decode.blocks.num_free_blocks < d_total
            assert pair.decode.load().num_running == 0
            pair.abort("v", prefill=False)   # only decode: its ABORT must end the prefill lease
            assert pair.decode.blocks.num_used_blocks == -(-len(other) // BLOCK_SIZE)
        elif state == "decode-running":
            pair.forward("v")
            pair.run_until(lambda: len(pair.tokens["v"]) >= 3, "three tokens of v")
            pair.abort("v")
            assert pair.decode.scheduler.get("v") is None
    n_before = len(pair.tokens.get("v", []))
    pair.forward_auto = True
    pair.run_to_end(["other"])
    pair.drain()
    assert len(pair.tokens.get("v", [])) == n_before, "tokens for v after its abort"
    assert "v" not in pair.finish and "v" not in pair.failed
    assert pair.tokens["other"] == expected_tokens(oracle, [other], params_of(sp(6)))[0]
    pair.assert_all_free()
    assert pair.prefill.blocks.num_free_blocks == p_total
    # how each lease ended: "other" by its hand-off; "v" by the abort, wherever it reached it
    # (running: v's ACK may reach prefill after the router's abort, which then ended the lease)
    stats = pair.prefill.sender.leases.stats()
    want = {"prefill-waiting": [(1, 0)], "prefill-leased": [(1, 1)], "decode-pending": [(1, 1)],
            "decode-pulling": [(1, 1)], "decode-running": [(2, 0), (1, 1)]}[state]
    assert (stats.num_done, stats.num_aborted) in want
    assert stats.num_expired == stats.num_failed == 0


def test_abort_of_unknown_or_finished_requests_is_harmless(make_pair):
    pair = make_pair()
    pair.abort("nobody")
    pair.submit("r", prompt_ids(5, seed=50), sp(3))
    pair.run_to_end(["r"])
    pair.abort("r")
    pair.abort("r")
    pair.step()
    assert pair.failed == {}
    pair.assert_all_free()


# -- bad work --------------------------------------------------------------------------------------
def test_bad_work_fails_that_request_and_the_workers_keep_serving(make_pair, oracle):
    good, other = prompt_ids(11, seed=70), prompt_ids(6, seed=71)
    pair = make_pair(forward=False)
    pair.submit("good", good, sp(10))
    pair.submit("other", other, sp(4))
    # bad prefill work: an empty prompt, a token outside the vocabulary, max_tokens 0, a DecodeWork
    pair.submit("p-empty", [], sp(4))
    pair.submit("p-vocab", [5, VOCAB + 3, 7], sp(4))
    pair.submit("p-zero", [5, 6, 7], sp(0))
    pair.submit("p-long", [5] * 1000, sp(100))
    pair.prefill.handle(wpb.ToWorker(decode=wpb.DecodeWork(req_id="p-kind")), time.monotonic())
    pair.step_prefill()
    assert set(pair.done) == {"good", "other"}
    assert set(pair.failed) == {"p-empty", "p-vocab", "p-zero", "p-long", "p-kind"}
    assert "prompt is empty" in pair.failed["p-empty"]
    assert str(VOCAB + 3) in pair.failed["p-vocab"]
    assert "max_tokens" in pair.failed["p-zero"]
    assert "cannot take" in pair.failed["p-kind"]

    pair.forward("good")
    pair.step_decode()                  # good is under way while the bad ones arrive
    offer_other = pair.done["other"].offer
    bad = {
        "d-garbage": dict(offer=b"garbage"),
        "d-empty-offer": dict(offer=b""),
        "d-not-an-offer": dict(offer=pickle.dumps({"transfer_id": "x"})),
        "d-wrong-length": dict(offer=offer_other, prompt_token_ids=other + [9]),
        "d-empty-prompt": dict(offer=offer_other, prompt_token_ids=[]),
        "d-vocab": dict(offer=offer_other, prompt_token_ids=[VOCAB] * len(other)),
        "d-zero": dict(offer=offer_other, sampling=sp(0)),
    }
    for req_id, changes in bad.items():
        pair.forward(req_id, source="other", **changes)
    pair.decode.handle(wpb.ToWorker(prefill=wpb.PrefillWork(req_id="d-kind")), time.monotonic())
    pair.decode.handle(wpb.ToWorker(), time.monotonic())          # no kind at all
    pair.step_decode()
    assert set(bad) | {"d-kind"} <= set(pair.failed)
    assert "does not match" in pair.failed["d-wrong-length"]
    pair.forward("other")               # the real one, after its bad copies
    pair.forward_auto = True
    pair.run_to_end(["good", "other"])
    assert pair.tokens["good"] == expected_tokens(oracle, [good], params_of(sp(10)))[0]
    assert pair.tokens["other"] == expected_tokens(oracle, [other], params_of(sp(4)))[0]
    assert "good" not in pair.failed and "other" not in pair.failed
    pair.assert_all_free()


def test_offer_bytes_raising_valueerror_give_a_failed_message(make_pair):
    pair = make_pair()
    bad_work = wpb.DecodeWork(req_id="bad", prompt_token_ids=[5, 6, 7], sampling=sp(4),
                              first_token_id=9, offer=b"\x80\x09")   # "unsupported pickle protocol: 9"
    try:
        pair.decode.handle(wpb.ToWorker(decode=bad_work), time.monotonic())
        pair.step_decode()
        assert "bad" in pair.failed
    finally:
        pair.assert_all_free()


def test_first_token_outside_the_vocabulary_fails_only_that_request(make_pair, oracle):
    good, other = prompt_ids(9, seed=80), prompt_ids(8, seed=81)
    pair = make_pair(forward=False)
    pair.submit("good", good, sp(8))
    pair.submit("bad", other, sp(8))
    pair.step_prefill()
    pair.forward("good")
    pair.forward("bad", first_token_id=VOCAB + 7)
    pair.forward_auto = True
    try:
        pair.run_to_end(["good", "bad"])
        assert "good" not in pair.failed, pair.failed.get("good")
        assert pair.tokens["good"] == expected_tokens(oracle, [good], params_of(sp(8)))[0]
        assert "bad" in pair.failed
    finally:
        pair.abort("bad")
        pair.assert_all_free()


# -- scheduling details ------------------------------------------------------------------------------
def test_prefill_batches_under_the_token_budget_and_sequence_limit_in_arrival_order(make_pair, oracle):
    # budget 16 tokens, 2 prompts a step: [9, 6] | [30 alone: over the budget, it must not starve] | [5, 4]
    lengths = [9, 6, 30, 5, 4]
    prompts = [prompt_ids(n, seed=110 + i) for i, n in enumerate(lengths)]
    pair = make_pair(prefill_max_tokens=16, prefill_max_seqs=2)
    for i, prompt in enumerate(prompts):
        pair.submit(f"b{i}", prompt, sp(4))
    batches = []
    for _ in range(3):
        out = pair.step_prefill()
        batches.append([d.req_id for d in out.prefilled])
    assert batches == [["b0", "b1"], ["b2"], ["b3", "b4"]]
    assert pair.prefill.num_steps == 3
    pair.run_to_end([f"b{i}" for i in range(5)])
    want = expected_tokens(oracle, prompts, params_of(sp(4)))
    assert [pair.tokens[f"b{i}"] for i in range(5)] == want
    pair.assert_all_free()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_preemption_under_a_small_cache_keeps_the_tokens(make_pair, oracle, backend):
    """Pulled requests outgrow the decode cache: the newest is preempted and recomputed there."""
    prompts = [prompt_ids(6, seed=120), prompt_ids(7, seed=121)]
    pair = make_pair(backend=backend, decode_blocks=8)     # each needs 5 blocks at the end: 10 > 8
    for i, prompt in enumerate(prompts):
        pair.submit(f"g{i}", prompt, sp(13))
    preempted = set()

    def check():
        preempted.update(s.req_id for s in pair.decode.scheduler.waiting)
        return all(f"g{i}" in pair.finish for i in range(2)) or bool(pair.failed)
    pair.run_until(check, "both to end")
    assert pair.failed == {}
    assert preempted                                    # the cache really was too small
    want = expected_tokens(oracle, prompts, params_of(sp(13)))
    assert [pair.tokens["g0"], pair.tokens["g1"]] == want
    pair.assert_all_free()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_and_decode_with_different_block_sizes(make_pair, oracle, backend):
    prompts = [prompt_ids(n, seed=130 + n) for n in (5, 13, 21)]
    pair = make_pair(backend=backend, decode_block_size=8, decode_blocks=32)
    for i, prompt in enumerate(prompts):
        pair.submit(f"x{i}", prompt, sp(8))
    pair.run_to_end(["x0", "x1", "x2"])
    assert pair.failed == {}
    assert [pair.tokens[f"x{i}"] for i in range(3)] == expected_tokens(oracle, prompts, params_of(sp(8)))
    pair.assert_all_free()
    assert pair.prefill.sender.leases.stats().num_done == 3       # pulled, not recomputed

