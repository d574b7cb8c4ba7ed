"""Layer-wise KV streaming between a prefill and a decode worker in one process.

With `transfer.stream_layers` the prefill worker offers a request's KV before
its forward pass and hands the offer out at once (`on_offer`); here the test
plays the router and passes it straight to `DecodeWorker.prefetch`, so the
decode side pulls while the prompt runs and the sender pushes each layer from
the model's per-layer hook. The oracle is the engine (which the non-streamed
path also matches, see tests/worker_pair.py): a streamed transfer must
give the same tokens, and every test ends with every block free on both sides.
"""
from __future__ import annotations

import time

import pytest

from engine.errors import EngineError
from prefill_worker.worker import PrefillWorker
from tests.worker_pair import (BLOCK_SIZE, BACKENDS, expected_tokens, params_of, prompt_ids, sp,  # noqa: F401
                               make_pair, oracle, tiny_dir)

pytestmark = pytest.mark.slow


def _stream_pair(make_pair, backend: str, early: bool = True, **kw):
    pair = make_pair(backend=backend, stream_layers=True, **kw)
    assert pair.prefill.stream_layers
    pair.prefetched = []
    if early:   # the router's part: the early offer goes to the decode worker at once
        pair.prefill.on_offer = lambda req_id, offer: pair.prefetched.append(
            (req_id, pair.decode.prefetch(offer, time.monotonic())))
    return pair


def _record_sent(pair) -> list[tuple[int, dict[str, int]]]:
    """(layers ready, layers sent per transfer) after every layers_ready call of the hook."""
    sender, calls = pair.prefill.sender, []
    real = sender.layers_ready

    def layers_ready(tids, num_layers, now):
        real(tids, num_layers, now)
        # the tiny model's whole forward takes a few ms: as a real layer would, give the early
        # PULLs (over loopback TCP) time to reach the sender before the next layer (bounded)
        stop_at = time.monotonic() + 2.0
        while num_layers == 1 and time.monotonic() < stop_at and \
                not all(sender._streams[t].peer for t in tids if t in sender._streams):
            time.sleep(0.001)
            real(tids, num_layers, time.monotonic())
        calls.append((num_layers, {t: sender._streams[t].sent for t in tids if t in sender._streams}))
    sender.layers_ready = layers_ready
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_transfer_gives_the_engines_tokens_and_overlaps_the_forward(make_pair, oracle, backend):
    lengths, max_tokens = [3, 8, 13, 37], [7, 5, 9, 6]
    prompts = [prompt_ids(n, seed=200 + i) for i, n in enumerate(lengths)]
    pair = _stream_pair(make_pair, backend)
    calls = _record_sent(pair)
    for i, (prompt, mt) in enumerate(zip(prompts, max_tokens)):
        pair.submit(f"s{i}", prompt, sp(mt))
    pair.step_prefill()            # one packed prefill; decode pulled from its early offers meanwhile
    assert pair.prefetched == [(f"s{i}", True) for i in range(len(prompts))]
    num_layers = pair.prefill.sender.layout.local_layers
    assert num_layers > 2
    # layers left for the receiver while later layers still computed: by the hook of the last
    # layer, everything before it was already on the wire (the PULL came after layer 0 at the latest)
    per_layer = [c for c in calls if c[0] is not None]
    assert [n for n, _ in per_layer] == list(range(1, num_layers + 1))
    before_last = per_layer[-2][1]
    assert len(before_last) == len(prompts) and all(sent == num_layers - 1 for sent in before_last.values())
    pair.run_to_end([f"s{i}" for i in range(len(prompts))])
    assert pair.failed == {}
    want = expected_tokens(oracle, prompts, [params_of(sp(mt)) for mt in max_tokens])
    for i in range(len(prompts)):
        assert pair.tokens[f"s{i}"] == want[i], f"s{i} ({lengths[i]} tokens)"
        assert pair.transfer_s[f"s{i}"] > 0
    pair.assert_all_free()
    stats = pair.prefill.sender.leases.stats()
    assert stats.num_done == len(prompts) and stats.num_failed == stats.num_expired == 0
    assert not pair.decode._early


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_offer_pulled_only_after_the_prefill_is_served_whole(make_pair, oracle, backend):
    """No early pull (a router that forwards only PrefillDone): the same offer, all layers ready."""
    prompts = [prompt_ids(n, seed=210 + n) for n in (6, 19)]
    pair = _stream_pair(make_pair, backend, early=False)
    for i, prompt in enumerate(prompts):
        pair.submit(f"l{i}", prompt, sp(6))
    pair.run_to_end(["l0", "l1"])
    assert [pair.tokens["l0"], pair.tokens["l1"]] == expected_tokens(oracle, prompts, params_of(sp(6)))
    pair.assert_all_free()
    assert pair.prefill.sender.leases.stats().num_done == 2


def test_a_request_ending_at_its_first_token_frees_the_early_pull(make_pair, oracle):
    """Its lease is aborted at prefill, but the last layer may already have landed (DONE):
    the router, which forwarded the early offer, sends decode an Abort too."""
    prompts = [prompt_ids(n, seed=220 + n) for n in (9, 14)]
    pair = _stream_pair(make_pair, "zmq")
    pair.submit("one", prompts[0], sp(1))      # ends at prefill
    pair.submit("more", prompts[1], sp(5))
    pair.step_prefill()
    assert pair.finish["one"] == "length" and not pair.done["one"].offer
    pair.abort("one", prefill=False)            # the router's part
    assert "one" not in pair.decode._early
    pair.run_to_end(["more"])
    pair.drain()
    assert pair.tokens["more"] == expected_tokens(oracle, [prompts[1]], params_of(sp(5)))[0]
    pair.assert_all_free()
    stats = pair.prefill.sender.leases.stats()
    assert stats.num_done + stats.num_aborted == 2 and stats.num_done >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prefill_failing_mid_forward_fails_the_early_pull_at_once(make_pair, backend):
    pair = _stream_pair(make_pair, backend)
    runner = pair.prefill.runner
    real = runner.execute

    def broken(plan, on_layer=None):
        on_layer(0)
        on_layer(1)
        raise RuntimeError("the accelerator fell over")
    runner.execute = broken
    pair.submit("x", prompt_ids(11, seed=230), sp(5))
    pair.step_prefill()
    assert "prefill step failed" in pair.failed["x"]
    assert pair.prefill.load().num_leases == 0
    start = time.monotonic()
    pair.run_until(lambda: not pair.decode._early, "the early pull to fail", timeout_s=5)
    assert time.monotonic() - start < 2.0     # an ERROR, not the receiver's 10 s timeout
    runner.execute = real
    pair.assert_all_free()


def test_decode_abort_of_an_early_pull_ends_the_prefill_lease(make_pair, oracle):
    pair = _stream_pair(make_pair, "zmq", forward=False)
    pair.submit("v", prompt_ids(10, seed=240), sp(5))
    pair.submit("w", prompt_ids(7, seed=241), sp(4))
    pair.step_prefill()
    assert set(pair.decode._early) == {"v", "w"}
    pair.abort("v", prefill=False)      # only decode: its ABORT must end the prefill lease
    assert set(pair.decode._early) == {"w"}
    pair.forward("w")
    pair.run_to_end(["w"])
    pair.drain()
    assert pair.tokens["w"] == expected_tokens(oracle, [prompt_ids(7, seed=241)], params_of(sp(4)))[0]
    pair.assert_all_free()
    stats = pair.prefill.sender.leases.stats()
    assert (stats.num_done, stats.num_aborted) == (1, 1)


def test_unclaimed_early_kv_is_freed_after_its_ttl(make_pair):
    pair = _stream_pair(make_pair, "zmq", forward=False)
    pair.decode.early_ttl_s = 0.05
    pair.submit("lost", prompt_ids(9, seed=250), sp(5))
    pair.step_prefill()
    pair.run_until(lambda: "lost" in pair.decode._early and pair.decode._early["lost"].done_at is not None,
                   "the early KV to land", timeout_s=5)
    assert pair.decode.blocks.num_free_blocks < pair.decode.blocks.num_blocks
    time.sleep(0.1)
    pair.step_decode()
    assert not pair.decode._early
    pair.abort("lost", decode=False)     # the router gives up on it at prefill too
    pair.assert_all_free()


def test_stream_layers_needs_a_streaming_backend(make_pair):
    pair = make_pair(backend="shm-copy")
    p = pair.prefill
    with pytest.raises(EngineError, match="stream_layers"):
        PrefillWorker("p1", p.runner, p.blocks, p.sender, vocab_size=p.vocab_size,
                      eos_token_ids=p.eos_token_ids, max_model_len=p.max_model_len, stream_layers=True)
