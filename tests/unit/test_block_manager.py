"""BlockManager: check-then-commit, reference counts, growth and prefix hashes.

Pure Python; no torch. The randomized test keeps its own model of who holds
which block and compares the manager with it after every operation.
"""
from __future__ import annotations

import random

import pytest

from engine.block_manager import NO_HASH, BlockManager, blocks_needed, prefix_hashes
from engine.errors import OutOfBlocksError


def snapshot(bm: BlockManager) -> tuple:
    """Everything observable about a manager's state."""
    return (
        bm.num_free_blocks,
        bm.num_used_blocks,
        tuple(bm.ref_count(b) for b in range(bm.num_blocks)),
        tuple(bm.block_hash(b) for b in range(bm.num_blocks)),
        dict(bm.hash_to_block),
    )


# -- construction -------------------------------------------------------------

@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (4, 0), (-1, 4)])
def test_rejects_non_positive_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_fresh_manager_is_all_free():
    bm = BlockManager(8, 4)
    assert bm.num_free_blocks == 8
    assert bm.num_used_blocks == 0
    assert all(bm.ref_count(b) == 0 for b in range(8))
    assert bm.hash_to_block == {}


# -- check, then commit ---------------------------------------------------------

def test_can_allocate_has_no_side_effect():
    bm = BlockManager(4, 4)
    held = bm.allocate(5, list(range(5)))           # 2 blocks, one hashed
    before = snapshot(bm)
    for n in range(0, 40):
        bm.can_allocate(n)
        bm.can_append(len(held), n)
    assert snapshot(bm) == before


@pytest.mark.parametrize("num_tokens", range(0, 4 * 4 + 6))
def test_allocate_raises_only_when_the_check_says_no(num_tokens):
    bm = BlockManager(4, 4)
    ok = bm.can_allocate(num_tokens)
    assert ok == (num_tokens <= 16)
    before = snapshot(bm)
    if ok:
        ids = bm.allocate(num_tokens)
        assert len(ids) == blocks_needed(num_tokens, 4)
        assert len(set(ids)) == len(ids)
        assert bm.num_free_blocks == 4 - len(ids)
    else:
        with pytest.raises(OutOfBlocksError):
            bm.allocate(num_tokens)
        assert snapshot(bm) == before               # a refused allocate changes nothing


def test_can_allocate_tracks_free_blocks_after_allocations():
    bm = BlockManager(4, 4)
    bm.allocate(9)                                  # 3 blocks
    assert bm.can_allocate(4)
    assert not bm.can_allocate(5)
    with pytest.raises(OutOfBlocksError):
        bm.allocate(5)
    assert bm.num_free_blocks == 1
    bm.allocate(4)
    assert bm.num_free_blocks == 0
    assert bm.can_allocate(0)
    assert not bm.can_allocate(1)


# -- free and ref counts ---------------------------------------------------------

def test_free_returns_blocks_for_reuse():
    bm = BlockManager(3, 4)
    a = bm.allocate(12)
    assert bm.num_free_blocks == 0
    assert all(bm.ref_count(b) == 1 for b in a)
    bm.free(a)
    assert bm.num_free_blocks == 3
    assert all(bm.ref_count(b) == 0 for b in a)
    b = bm.allocate(12)                             # the same blocks come back
    assert sorted(b) == sorted(a)
    bm.free(b)


def test_double_free_raises_and_leaves_state_alone():
    bm = BlockManager(4, 4)
    a = bm.allocate(4)
    other = bm.allocate(4)
    bm.free(a)
    before = snapshot(bm)
    with pytest.raises(ValueError):
        bm.free(a)
    assert snapshot(bm) == before
    bm.free(other)
    assert bm.num_free_blocks == 4


def test_free_of_never_allocated_block_raises():
    bm = BlockManager(4, 4)
    with pytest.raises(ValueError):
        bm.free([2])
    assert bm.num_free_blocks == 4


def test_share_counts_references_and_last_free_releases():
    bm = BlockManager(4, 4)
    a = bm.allocate(8)
    bm.share(a)
    bm.share(a[:1])
    assert [bm.ref_count(b) for b in a] == [3, 2]
    assert bm.num_free_blocks == 2
    bm.free(a)
    assert [bm.ref_count(b) for b in a] == [2, 1]
    assert bm.num_free_blocks == 2                  # still held by the sharers
    bm.free(a)
    assert [bm.ref_count(b) for b in a] == [1, 0]
    assert bm.num_free_blocks == 3
    bm.free(a[:1])
    assert bm.ref_count(a[0]) == 0
    assert bm.num_free_blocks == 4
    with pytest.raises(ValueError):
        bm.free(a[:1])


def test_share_of_free_block_raises():
    bm = BlockManager(4, 4)
    with pytest.raises(ValueError):
        bm.share([0])
    a = bm.allocate(4)
    bm.free(a)
    with pytest.raises(ValueError):
        bm.share(a)
    assert bm.num_free_blocks == 4
    assert bm.ref_count(a[0]) == 0


# -- growing a sequence -------------------------------------------------------------

def test_allocate_block_counts_at_boundaries():
    bm = BlockManager(8, 16)
    for n, expected in [(0, 0), (1, 1), (15, 1), (16, 1), (17, 2), (32, 2), (33, 3)]:
        ids = bm.allocate(n)
        assert len(ids) == expected, n
        bm.free(ids)
    assert bm.num_free_blocks == 8


def test_append_grows_exactly_at_block_boundaries():
    bm = BlockManager(8, 16)
    ids = bm.allocate(1)
    assert len(ids) == 1
    table_history = [list(ids)]
    for n in range(2, 16 * 3 + 2):
        assert bm.can_append(len(ids), n)
        bm.append(ids, n)
        assert len(ids) == blocks_needed(n, 16), n
        assert ids[:len(table_history[-1])] == table_history[-1]     # only grows at the end
        table_history.append(list(ids))
    lens = {n: len(t) for n, t in zip(range(1, 16 * 3 + 2), table_history)}
    assert lens[16] == 1 and lens[17] == 2
    assert lens[32] == 2 and lens[33] == 3
    assert lens[48] == 3 and lens[49] == 4
    assert bm.num_used_blocks == 4
    # Appending to a length already covered takes nothing.
    before = snapshot(bm)
    bm.append(ids, 49)
    bm.append(ids, 40)
    assert snapshot(bm) == before
    bm.free(ids)
    assert bm.num_free_blocks == 8


def test_append_raises_only_when_the_check_says_no():
    bm = BlockManager(4, 4)
    ids = bm.allocate(4)
    other = bm.allocate(4)
    assert bm.can_append(len(ids), 8)
    assert bm.can_append(len(ids), 12)
    assert not bm.can_append(len(ids), 13)          # needs 3 more, 2 free
    before = snapshot(bm)
    with pytest.raises(OutOfBlocksError):
        bm.append(ids, 13)
    assert len(ids) == 1                            # untouched by the refused append
    assert snapshot(bm) == before
    bm.append(ids, 12)
    assert len(ids) == 3 and bm.num_free_blocks == 0
    assert bm.can_append(len(ids), 12)
    assert not bm.can_append(len(ids), 13)
    bm.free(ids)
    bm.free(other)
    assert bm.num_free_blocks == 4


# -- prefix hashes -------------------------------------------------------------------

def test_prefix_hashes_only_for_full_blocks():
    assert prefix_hashes([], 16) == []
    assert prefix_hashes(list(range(15)), 16) == []
    assert len(prefix_hashes(list(range(16)), 16)) == 1
    assert len(prefix_hashes(list(range(31)), 16)) == 1
    assert len(prefix_hashes(list(range(32)), 16)) == 2
    assert len(prefix_hashes(list(range(33)), 16)) == 2
    assert NO_HASH not in prefix_hashes(list(range(64)), 16)


def test_prefix_hashes_equal_for_equal_prefixes():
    a = list(range(100, 148))                       # 3 full blocks
    b = a[:32] + [7] * 16                           # same first two blocks, third differs
    ha, hb = prefix_hashes(a, 16), prefix_hashes(b, 16)
    assert ha[:2] == hb[:2]
    assert ha[2] != hb[2]
    # A longer sequence with the same prefix has the same leading hashes.
    assert prefix_hashes(a + [1, 2, 3], 16) == ha
    assert prefix_hashes(a[:32], 16) == ha[:2]
    # Deterministic (no per-call state).
    assert prefix_hashes(list(a), 16) == ha


def test_prefix_hash_chains_over_earlier_blocks():
    block2 = list(range(500, 516))
    a = list(range(16)) + block2
    b = list(range(1, 17)) + block2                 # first block differs, second identical
    ha, hb = prefix_hashes(a, 16), prefix_hashes(b, 16)
    assert ha[0] != hb[0]
    assert ha[1] != hb[1]                           # the parent's hash is part of the child's
    # Swapping blocks changes every hash too.
    c = block2 + list(range(16))
    assert prefix_hashes(c, 16)[1] != ha[1]


def test_allocate_with_tokens_hashes_full_blocks_only():
    bm = BlockManager(8, 16)
    tokens = list(range(1000, 1040))               # 40 tokens: 2 full blocks + 8
    ids = bm.allocate(len(tokens), tokens)
    assert len(ids) == 3
    expected = prefix_hashes(tokens, 16)
    assert [bm.block_hash(b) for b in ids] == expected + [NO_HASH]
    assert bm.hash_to_block == {expected[0]: ids[0], expected[1]: ids[1]}
    # Without tokens nothing is hashed.
    plain = bm.allocate(32)
    assert all(bm.block_hash(b) == NO_HASH for b in plain)
    assert len(bm.hash_to_block) == 2
    bm.free(ids)
    bm.free(plain)
    assert bm.num_free_blocks == 8


def test_hash_to_block_cleaned_when_block_freed():
    bm = BlockManager(8, 4)
    tokens = list(range(12))
    ids = bm.allocate(12, tokens)
    hashes = prefix_hashes(tokens, 4)
    assert set(bm.hash_to_block) == set(hashes)
    bm.share(ids[:1])                               # a lease on the first block
    bm.free(ids)
    # The leased block keeps its hash; the other two lose theirs.
    assert bm.hash_to_block == {hashes[0]: ids[0]}
    assert bm.block_hash(ids[0]) == hashes[0]
    assert bm.block_hash(ids[1]) == NO_HASH and bm.block_hash(ids[2]) == NO_HASH
    bm.free(ids[:1])
    assert bm.hash_to_block == {}
    assert all(bm.block_hash(b) == NO_HASH for b in range(8))
    # A reused block does not carry an old hash.
    again = bm.allocate(32)
    assert all(bm.block_hash(b) == NO_HASH for b in again)
    bm.free(again)
    assert bm.num_free_blocks == 8


def test_freeing_older_duplicate_keeps_mapping_of_live_block():
    bm = BlockManager(8, 4)
    tokens = [5, 6, 7, 8]
    (old,) = bm.allocate(4, tokens)
    (new,) = bm.allocate(4, tokens)
    (h,) = prefix_hashes(tokens, 4)
    assert bm.hash_to_block[h] == new
    bm.free([old])
    assert bm.hash_to_block == {h: new}             # not removed by the other block's release
    bm.free([new])
    assert bm.hash_to_block == {}


# -- randomized property test ---------------------------------------------------------

def check_invariants(bm: BlockManager, owners: list[list[int]]) -> None:
    expected = [0] * bm.num_blocks
    for held in owners:
        for b in held:
            expected[b] += 1
    counts = [bm.ref_count(b) for b in range(bm.num_blocks)]
    assert all(c >= 0 for c in counts)
    assert counts == expected
    used = sum(1 for c in counts if c > 0)
    assert bm.num_used_blocks == used
    assert bm.num_free_blocks + used == bm.num_blocks
    for b in range(bm.num_blocks):
        if counts[b] == 0:
            assert bm.block_hash(b) == NO_HASH
    for h, b in bm.hash_to_block.items():
        assert counts[b] > 0                        # never points at a free block
        assert bm.block_hash(b) == h


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_random_allocate_append_share_free_keeps_invariants(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 16])
    bm = BlockManager(rng.randint(4, 24), block_size)
    # Each owner: [block ids, num tokens]. Sharers hold full blocks only.
    owners: list[list] = []
    ops = {"alloc": 0, "alloc_refused": 0, "append": 0, "append_refused": 0, "share": 0, "free": 0}
    for _ in range(2000):
        op = rng.random()
        if op < 0.3 or not owners:
            n = rng.randint(0, 3 * block_size * 2)
            tokens = [rng.randint(0, 2) for _ in range(n)] if rng.random() < 0.5 else None
            if bm.can_allocate(n):
                ids = bm.allocate(n, tokens)
                assert len(ids) == blocks_needed(n, block_size)
                owners.append([ids, n])
                ops["alloc"] += 1
            else:
                before = snapshot(bm)
                with pytest.raises(OutOfBlocksError):
                    bm.allocate(n, tokens)
                assert snapshot(bm) == before
                ops["alloc_refused"] += 1
        elif op < 0.6:
            owner = rng.choice(owners)
            ids, n = owner
            new_n = n + rng.randint(0, 2 * block_size)
            if bm.can_append(len(ids), new_n):
                bm.append(ids, new_n)
                assert len(ids) == max(blocks_needed(new_n, block_size), blocks_needed(n, block_size))
                owner[1] = new_n
                ops["append"] += 1
            else:
                before = snapshot(bm)
                held = list(ids)
                with pytest.raises(OutOfBlocksError):
                    bm.append(ids, new_n)
                assert ids == held and snapshot(bm) == before
                ops["append_refused"] += 1
        elif op < 0.75:
            ids = rng.choice(owners)[0]
            if ids:
                k = rng.randint(1, len(ids))
                lease = list(ids[:k])
                bm.share(lease)
                owners.append([lease, k * block_size])
                ops["share"] += 1
        else:
            ids, _ = owners.pop(rng.randrange(len(owners)))
            bm.free(ids)
            ops["free"] += 1
        check_invariants(bm, [o[0] for o in owners])
    # Every kind of operation happened, including refusals.
    assert all(v > 0 for v in ops.values()), ops
    rng.shuffle(owners)
    for ids, _ in owners:
        bm.free(ids)
    check_invariants(bm, [])
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.hash_to_block == {}


def test_free_with_a_bad_id_frees_nothing():
    bm = BlockManager(8, 4)
    held = bm.allocate(8)
    with pytest.raises(ValueError):
        bm.free([held[0], 7])          # 7 was never allocated
    with pytest.raises(ValueError):
        bm.free([held[1], held[1]])    # one reference, freed twice in one call
    assert bm.num_free_blocks == 6 and all(bm.ref_count(b) == 1 for b in held)
    bm.free(held)
    assert bm.num_free_blocks == 8
