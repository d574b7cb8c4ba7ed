"""Prefix caching in the engine: a prompt over a cached prefix computes only its new tokens,
and the output is still token-identical to transformers' generate (fp32).

Hits, partial hits, a multi-turn conversation whose turns extend the earlier ones,
and evictions under a small cache, in one engine; every block is free at the end and
the blocks were shared and freed exactly once (the block manager raises otherwise).
"""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.block_manager import BlockManager, prefix_hashes
from tests.helpers import hf_greedy, save_tiny_model

MAX_NEW = 12
BLOCK = 4


# -- the block manager alone (pure) -------------------------------------------------------------
def _cached(bm: BlockManager, tokens: list[int]) -> list[int]:
    ids, _ = bm.allocate_cached(len(tokens), tokens)
    bm.set_hashes(ids, tokens)   # as a scheduler does once the step computed them
    return ids


def test_a_freed_hashed_block_is_found_again_until_it_is_taken_for_other_contents():
    bm = BlockManager(6, BLOCK, enable_prefix_caching=True)
    a = list(range(10, 22))                        # 3 full blocks
    ids = _cached(bm, a)
    bm.free(ids)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 3
    # the same prompt plus more: its first two blocks hit (never the block of its last token)
    again, cached = bm.allocate_cached(14, a + [1, 2])
    assert cached == 12 and again[:3] == ids and bm.ref_count(ids[0]) == 1
    bm.free(again)
    # fresh blocks come from the oldest freed first, evicting what they cached
    others = bm.allocate(6 * BLOCK)
    assert bm.num_cached_blocks == 0 and bm.num_evictions == 3
    bm.free(others)
    assert bm.allocate_cached(len(a), a)[1] == 0


def test_a_shared_prefix_is_held_by_every_request_on_it_and_freed_exactly_once():
    bm = BlockManager(8, BLOCK, enable_prefix_caching=True)
    p = list(range(100, 112))
    first = _cached(bm, p + [7])
    second, cached = bm.allocate_cached(13, p + [8])
    assert cached == 12 and second[:3] == first[:3] and bm.ref_count(first[0]) == 2
    bm.free(first)
    assert bm.ref_count(first[0]) == 1 and first[0] not in [b for b in range(8) if bm.ref_count(b) == 0]
    bm.free(second)
    assert all(bm.ref_count(b) == 0 for b in range(8)) and bm.num_free_blocks == 8
    with pytest.raises(ValueError):
        bm.free(second[:1])                        # a second free of a block is refused


def test_can_allocate_cached_counts_idle_hits_as_leaving_the_free_list():
    bm = BlockManager(4, BLOCK, enable_prefix_caching=True)
    p = list(range(50, 62))
    bm.free(_cached(bm, p + [1]))                  # 4 blocks, 3 cached and idle
    assert bm.can_allocate_cached(16, p + [2, 3, 4, 5])          # 3 hits + 1 fresh
    assert not bm.can_allocate_cached(20, p + [2, 3, 4, 5, 6, 7, 8, 9])   # 3 hits + 2 fresh > 1 left


def test_a_partly_evicted_prefix_keeps_its_head():
    """A sequence's blocks go back last first: taking fresh blocks evicts its tail before its
    head, so a later prompt over the same prefix still finds the first blocks."""
    bm = BlockManager(12, BLOCK, enable_prefix_caching=True)
    p = list(range(200, 216))                      # 4 full blocks
    bm.free(_cached(bm, p + [1]))                  # 5 blocks back; the 7 never used are older
    taken = bm.allocate(9 * BLOCK)                 # the 7 unused, the partial last and p's 4th
    assert bm.num_evictions == 1
    bm.free(taken)
    ids, cached = bm.allocate_cached(17, p + [9])
    assert cached == 12 and bm.num_hit_tokens == 12   # p's first three blocks are still there
    bm.free(ids)
    assert bm.num_free_blocks == 12


def test_a_prefix_for_a_pull_is_aligned_and_not_counted_as_computed():
    """The decode side's lookup for a pull: whole multiples of `align_tokens` (the transfer's
    block edges on both sides), and not counted with the prompts a prefill computes."""
    bm = BlockManager(12, BLOCK, enable_prefix_caching=True)
    p = list(range(300, 320))                      # 5 full blocks
    bm.free(_cached(bm, p + [1]))
    queried, hits = bm.num_queried_tokens, bm.num_hit_tokens
    assert len(bm.cached_prefix(p + [2])) == 5
    assert len(bm.cached_prefix(p + [2], align_tokens=2 * BLOCK)) == 4
    ids, cached = bm.allocate_cached(21, p + [2], align_tokens=2 * BLOCK, to_compute=False)
    assert cached == 16 and (bm.num_queried_tokens, bm.num_hit_tokens) == (queried, hits)
    with pytest.raises(ValueError, match="align_tokens"):
        bm.cached_prefix(p, align_tokens=BLOCK + 1)
    bm.free(ids)
    assert bm.num_free_blocks == 12


def test_without_prefix_caching_nothing_is_found():
    bm = BlockManager(4, BLOCK)
    p = list(range(12))
    ids = bm.allocate(12)
    bm.set_hashes(ids, p)
    bm.free(ids)
    assert bm.cached_prefix(p + [1]) == [] and bm.hash_to_block == {}
    assert prefix_hashes(p, BLOCK)   # (the hashes exist; nothing keeps them)


# -- the engine, against transformers -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-prefix"))
    save_tiny_model(path, arch="llama", seed=11, vocab_size=512)
    from transformers import AutoModelForCausalLM
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _gb(blocks: int) -> float:
    # tiny llama: 3 layers, 2 KV heads of 16 dims, fp32: 2 * 3 * 2 * 16 * 4 bytes per token
    return blocks * BLOCK * 2 * 3 * 2 * 16 * 4 / 2**30


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True])
def test_hits_partial_hits_turns_and_evictions_match_transformers(tiny, chunked):
    path, hf = tiny
    llm = LLM(model=path, dtype="float32", block_size=BLOCK, kv_cache_memory_gb=_gb(40), num_threads=1,
              enable_prefix_caching=True, enable_chunked_prefill=chunked, max_num_batched_tokens=64)
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    system = [(7 * i) % 500 + 3 for i in range(30)]
    prompts = [system + [11, 12, 13], system + [21, 22], system[:17] + [5, 6, 7, 8, 9]]
    outs = llm.generate(prompts, greedy)          # one batch: they share nothing yet
    turn2 = prompts[0] + outs[0].token_ids + [40, 41, 42]   # a conversation's next turn
    later = llm.generate([system + [99, 98], turn2, prompts[2]], greedy)
    bm = llm.block_manager
    assert bm.num_hit_tokens >= 28 + 28 + 16      # each later prompt found its computed prefix
    for ids, out in zip(prompts + [system + [99, 98], turn2, prompts[2]], outs + later):
        assert out.token_ids == hf_greedy(hf, ids, MAX_NEW), f"a {len(ids)}-token prompt diverged"
    # a long unrelated prompt evicts cached blocks; what stays cached still hits correctly
    big = [(3 * i) % 400 + 50 for i in range(100)]
    assert llm.generate([big], greedy)[0].token_ids == hf_greedy(hf, big, MAX_NEW)
    assert bm.num_evictions > 0
    assert llm.generate([turn2], greedy)[0].token_ids == later[1].token_ids
    assert bm.num_free_blocks == bm.num_blocks
