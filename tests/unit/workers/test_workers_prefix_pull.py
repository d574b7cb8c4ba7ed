"""Workers in one process: a decode instance pulls only the KV of the prompt it does not hold.

With prefix caching on both sides, a conversation's next turn extends what
the decode worker already decoded: its pull skips those blocks (shared from
the decode side's cache) and only the rest of the prompt's KV moves. The
tokens are transformers' own greedy ones, turn after turn, through a cache
hit, a partial hit after evictions, and a miss; the bytes moved are the
prompt past the skipped prefix; every block is free at the end and none was
freed twice (BlockManager raises on that).
"""
from __future__ import annotations

import pytest
import torch

from engine.block_manager import blocks_needed
from tests.helpers import hf_greedy
from tests.worker_pair import BLOCK_SIZE, prompt_ids, sp

pytestmark = pytest.mark.slow     # a tiny model in two workers, transformers as the oracle

MAX_NEW = 6


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _turn(pair, req_id: str, prompt: list[int]) -> tuple[list[int], int, int]:
    """Run one request to its end; (its tokens, prompt tokens its pull skipped, KV bytes moved)."""
    skipped, moved = pair.decode.kv_tokens_skipped, pair.decode.kv_bytes_received
    pair.submit(req_id, prompt, sp(MAX_NEW))
    pair.run_to_end([req_id])
    assert req_id not in pair.failed, pair.failed
    return pair.tokens[req_id], pair.decode.kv_tokens_skipped - skipped, pair.decode.kv_bytes_received - moved


def _held_by_decode(prompt: list[int], prior: list[int]) -> int:
    """Tokens of `prompt` whose KV the decode worker computed or pulled for the `prior` sequence
    (its prompt and output, less the last token, whose KV nobody computed), in whole blocks, short
    of the prompt's last token."""
    common = 0
    while common < min(len(prompt), len(prior) - 1) and prompt[common] == prior[common]:
        common += 1
    return min(common // BLOCK_SIZE, (len(prompt) - 1) // BLOCK_SIZE) * BLOCK_SIZE


@pytest.mark.parametrize("backend,stream", [("zmq", False), ("shm-zero-copy", False), ("zmq", True),
                                            ("shm-zero-copy", True)])
def test_next_turns_pull_only_what_the_decode_instance_lacks(make_pair, hf, backend, stream):
    pair = make_pair(backend=backend, prefix_caching=True, stream_layers=stream, decode_blocks=40)
    per_token = pair.decode.receiver.layout.bytes_per_token
    first = prompt_ids(30, seed=5)
    out1, skipped, moved = _turn(pair, "t1", first)
    assert out1 == hf_greedy(hf, first, MAX_NEW)
    assert skipped == 0 and moved == len(first) * per_token          # nothing held yet: all of it

    second = first + out1 + prompt_ids(9, seed=6)                      # the conversation's next turn
    out2, skipped, moved = _turn(pair, "t2", second)
    assert out2 == hf_greedy(hf, second, MAX_NEW)
    held = _held_by_decode(second, first + out1)
    assert held >= 32 and skipped == held, (held, skipped)            # whole blocks of turn 1 stay
    assert moved == (len(second) - held) * per_token                   # only the rest moves

    # an unrelated long request takes most of the decode cache: some of turn 2's blocks are
    # evicted, least recently freed first, and a sequence's last blocks are freed first
    evictions = pair.decode.blocks.num_evictions
    other = prompt_ids(120, seed=7)
    out, _, _ = _turn(pair, "other", other)
    assert out == hf_greedy(hf, other, MAX_NEW)
    assert pair.decode.blocks.num_evictions > evictions

    third = second + out2 + prompt_ids(5, seed=8)
    out3, skipped, moved = _turn(pair, "t3", third)
    assert out3 == hf_greedy(hf, third, MAX_NEW)
    assert 0 < skipped < _held_by_decode(third, second + out2)         # a partial hit: the head stayed
    assert moved == (len(third) - skipped) * per_token

    pair.assert_all_free()
    blocks = pair.decode.blocks
    assert all(blocks.ref_count(b) == 0 for b in range(blocks.num_blocks))
    assert pair.decode.stats()["kv_tokens_skipped"] == pair.decode.kv_tokens_skipped > 0


def test_without_prefix_caching_every_pull_moves_the_whole_prompt(make_pair, hf):
    pair = make_pair(backend="zmq")
    first = prompt_ids(30, seed=5)
    out1, _, _ = _turn(pair, "t1", first)
    second = first + out1 + prompt_ids(9, seed=6)
    out2, skipped, moved = _turn(pair, "t2", second)
    assert out2 == hf_greedy(hf, second, MAX_NEW)
    assert skipped == 0 and moved == len(second) * pair.decode.receiver.layout.bytes_per_token
    pair.assert_all_free()


def test_a_pull_past_a_prefix_held_by_a_running_request_shares_its_blocks(make_pair, hf):
    """Two requests over one long prefix at the decode side at once: the second's pull skips the
    first's prompt blocks while the first still runs; both are transformers' tokens, and the shared
    blocks are freed once each (the last owner returns them)."""
    pair = make_pair(backend="shm-zero-copy", prefix_caching=True, decode_blocks=40)
    system = prompt_ids(40, seed=9)
    a, b = system + prompt_ids(3, seed=10), system + prompt_ids(5, seed=11)
    pair.submit("a", a, sp(24))
    pair.run_until(lambda: len(pair.tokens.get("a", [])) >= 3, "a decoding")
    skipped = pair.decode.kv_tokens_skipped
    pair.submit("b", b, sp(MAX_NEW))
    pair.run_until(lambda: "b" in pair.finish, "b to end")
    assert "a" not in pair.finish, "a should still run while b pulls past its prefix"
    assert pair.decode.kv_tokens_skipped - skipped == 40
    pair.run_to_end(["a"])
    assert pair.tokens["a"] == hf_greedy(hf, a, 24)
    assert pair.tokens["b"] == hf_greedy(hf, b, MAX_NEW)
    assert blocks_needed(len(system), BLOCK_SIZE) == 10
    pair.assert_all_free()


@pytest.mark.parametrize("backend", ["zmq", "shm-zero-copy"])
def test_two_prompts_over_one_cached_prefix_are_leased_at_once(make_pair, hf, backend):
    """The prefill instance holds the first prompt's KV under its lease while the second, over the
    same cached prefix, is prefilled and offered: their leases share the prefix's blocks (each its
    own reference). Both are pulled, in either order, and both are transformers' tokens; a shared
    block ending one lease keeps its contents (zero copy: its generation) for the other."""
    pair = make_pair(backend=backend, prefix_caching=True, forward=False)
    system = prompt_ids(40, seed=12)
    a, b = system + prompt_ids(3, seed=13), system + prompt_ids(5, seed=14)
    pair.submit("a", a, sp(MAX_NEW))
    pair.run_until(lambda: "a" in pair.done, "a prefilled")
    pair.submit("b", b, sp(MAX_NEW))
    pair.run_until(lambda: "b" in pair.done, "b prefilled over a's cached prefix")
    assert pair.prefill.blocks.num_hit_tokens >= 40 and pair.prefill.sender.leases.live() == 2
    pair.forward("b")
    pair.run_to_end(["b"])
    pair.forward("a")
    pair.run_to_end(["a"])
    assert pair.failed == {}
    assert pair.tokens["a"] == hf_greedy(hf, a, MAX_NEW) and pair.tokens["b"] == hf_greedy(hf, b, MAX_NEW)
    pair.assert_all_free()
