"""LeaseTable: every path of a prefill-side KV lease, and a randomized run beside a
real BlockManager in which every block must be freed exactly once.

Pure Python; the clock is a float the test advances.
"""
from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager
from kv_transfer.lease import LeaseEnd, LeaseState, LeaseTable

LIVE = (LeaseState.OFFERED, LeaseState.IN_FLIGHT)


def snapshot(table: LeaseTable, transfer_ids) -> tuple:
    """Everything observable about a table, for 'nothing changed' checks."""
    return (table.live(), table.held_blocks(), table.next_deadline(), table.stats(),
            tuple(table.get(t) for t in transfer_ids))


# -- happy path ------------------------------------------------------------------

def test_offer_start_complete():
    table = LeaseTable(default_ttl_s=30.0)
    table.offer("t1", "r1", [3, 4, 5], now=10.0)
    view = table.get("t1")
    assert view.state is LeaseState.OFFERED
    assert view.block_ids == (3, 4, 5) and view.req_id == "r1"
    assert view.offered_at == 10.0 and view.deadline == 40.0 and view.started_at is None
    assert table.live() == 1 and table.held_blocks() == 3

    assert table.start("t1", now=11.0) is True
    view = table.get("t1")
    assert view.state is LeaseState.IN_FLIGHT and view.started_at == 11.0
    assert view.deadline == 40.0                           # start does not extend the lease
    assert table.progress("t1", now=12.0, bytes_done=1000) is True
    assert table.get("t1").deadline == 40.0                # neither does progress
    assert table.get("t1").bytes_done == 1000

    end = table.complete("t1", now=13.0)
    assert end == LeaseEnd("t1", "r1", (3, 4, 5), LeaseState.DONE, "done")
    assert isinstance(end.block_ids, tuple)
    assert table.get("t1") is None                         # forgotten once ended
    assert table.live() == 0 and table.held_blocks() == 0 and table.next_deadline() is None
    stats = table.stats()
    assert (stats.num_offered, stats.num_started, stats.num_done) == (1, 1, 1)
    assert (stats.num_failed, stats.num_aborted, stats.num_expired) == (0, 0, 0)
    assert stats.bytes_done == 1000
    assert stats.by_outcome()[LeaseState.DONE] == 1


def test_complete_straight_from_offered():
    """A push backend may never call start."""
    table = LeaseTable()
    table.offer("t1", "r1", [0], now=0.0)
    end = table.complete("t1", now=1.0)
    assert end.outcome is LeaseState.DONE and end.block_ids == (0,)
    assert table.stats().num_started == 0


def test_ended_blocks_can_be_leased_again():
    table = LeaseTable()
    table.offer("t1", "r1", [0, 1], now=0.0)
    table.complete("t1", now=1.0)
    table.offer("t2", "r2", [1, 0], now=2.0)
    assert table.get("t2").block_ids == (1, 0)
    assert table.held_blocks() == 2


# -- failure, abort ----------------------------------------------------------------

@pytest.mark.parametrize("started", [False, True])
def test_fail(started):
    table = LeaseTable()
    table.offer("t1", "r1", [7, 8], now=0.0)
    if started:
        assert table.start("t1", now=1.0)
    end = table.fail("t1", now=2.0, reason="nccl timeout")
    assert end == LeaseEnd("t1", "r1", (7, 8), LeaseState.FAILED, "nccl timeout")
    assert table.live() == 0 and table.held_blocks() == 0
    assert table.stats().num_failed == 1
    assert table.fail("t1", now=3.0, reason="again") is None
    assert table.stats().num_failed == 1


@pytest.mark.parametrize("started", [False, True])
def test_abort(started):
    table = LeaseTable()
    table.offer("t1", "r1", [2], now=0.0)
    if started:
        table.start("t1", now=0.5)
    end = table.abort("t1", now=1.0)
    assert end == LeaseEnd("t1", "r1", (2,), LeaseState.ABORTED, "aborted")
    assert table.abort("t1", now=1.0, reason="shutdown") is None
    assert table.stats().num_aborted == 1
    table.offer("t2", "r2", [2], now=2.0)
    assert table.abort("t2", now=2.0, reason="shutdown").reason == "shutdown"


def test_abort_request_ends_every_lease_of_that_request_only():
    table = LeaseTable()
    table.offer("a1", "ra", [0, 1], now=0.0)
    table.offer("b1", "rb", [2], now=0.0)
    table.offer("a2", "ra", [3], now=1.0)
    table.offer("a3", "ra", [4, 5], now=2.0)
    table.start("a2", now=2.5)
    table.complete("a3", now=3.0)                          # already ended: not aborted again

    ends = table.abort_request("ra", now=4.0)
    assert [e.transfer_id for e in ends] == ["a1", "a2"]   # offer order
    assert all(e.outcome is LeaseState.ABORTED and e.req_id == "ra" for e in ends)
    assert sorted(b for e in ends for b in e.block_ids) == [0, 1, 3]
    assert table.live() == 1 and table.held_blocks() == 1 and table.get("b1") is not None
    assert table.abort_request("ra", now=5.0) == []
    assert table.abort_request("nobody", now=5.0) == []
    stats = table.stats()
    assert (stats.num_aborted, stats.num_done) == (2, 1)


# -- expiry ----------------------------------------------------------------------

@pytest.mark.parametrize("started", [False, True])
def test_expire_offered_and_in_flight(started):
    table = LeaseTable(default_ttl_s=5.0)
    table.offer("t1", "r1", [0, 1], now=0.0)
    if started:
        assert table.start("t1", now=4.0)
    assert table.expire(now=4.999) == []
    assert table.live() == 1
    ends = table.expire(now=5.0)                           # deadline <= now: due
    assert len(ends) == 1
    end = ends[0]
    assert (end.transfer_id, end.req_id, end.block_ids) == ("t1", "r1", (0, 1))
    assert end.outcome is LeaseState.EXPIRED
    assert ("in_flight" if started else "offered") in end.reason
    assert table.live() == 0 and table.held_blocks() == 0
    assert table.expire(now=100.0) == []
    assert table.stats().num_expired == 1


def test_late_outcomes_after_expiry_return_none_and_free_nothing():
    bm = BlockManager(8, 4)
    table = LeaseTable(default_ttl_s=1.0)
    blocks = bm.allocate(10)
    table.offer("t1", "r1", blocks, now=0.0)
    table.start("t1", now=0.5)
    for end in table.expire(now=2.0):
        bm.free(end.block_ids)
    assert bm.num_used_blocks == 0
    assert table.complete("t1", now=2.1) is None
    assert table.fail("t1", now=2.1, reason="x") is None
    assert table.abort("t1", now=2.1) is None
    assert table.abort_request("r1", now=2.1) == []
    assert table.start("t1", now=2.1) is False
    assert table.progress("t1", now=2.1, bytes_done=5) is False
    stats = table.stats()
    assert (stats.num_expired, stats.num_done, stats.num_failed, stats.num_aborted) == (1, 0, 0, 0)


def test_start_refused_once_due_even_before_expire_runs():
    table = LeaseTable(default_ttl_s=1.0)
    table.offer("t1", "r1", [0], now=0.0)
    before = snapshot(table, ["t1"])
    assert table.start("t1", now=1.0) is False
    assert snapshot(table, ["t1"]) == before
    assert [e.outcome for e in table.expire(now=1.0)] == [LeaseState.EXPIRED]


def test_outcome_reported_before_expire_runs_wins():
    table = LeaseTable(default_ttl_s=1.0)
    table.offer("t1", "r1", [0], now=0.0)
    table.start("t1", now=0.5)
    assert table.complete("t1", now=3.0).outcome is LeaseState.DONE
    assert table.expire(now=3.0) == []


def test_expire_returns_due_leases_in_deadline_order_only():
    table = LeaseTable(default_ttl_s=10.0)
    table.offer("late", "r1", [0], now=0.0)                # deadline 10
    table.offer("early", "r2", [1], now=1.0, ttl_s=2.0)    # deadline 3
    table.offer("mid", "r3", [2], now=2.0, ttl_s=5.0)      # deadline 7
    table.offer("tie", "r4", [3], now=4.0, ttl_s=3.0)      # deadline 7, offered later
    table.offer("gone", "r5", [4], now=0.0, ttl_s=1.0)     # deadline 1, completed first
    table.complete("gone", now=0.5)
    assert table.next_deadline() == 3.0
    assert [e.transfer_id for e in table.expire(now=7.0)] == ["early", "mid", "tie"]
    assert table.live() == 1 and table.get("late") is not None
    assert table.next_deadline() == 10.0
    assert [e.transfer_id for e in table.expire(now=50.0)] == ["late"]
    assert table.next_deadline() is None


def test_next_deadline_skips_ended_leases():
    table = LeaseTable(default_ttl_s=10.0)
    assert table.next_deadline() is None
    table.offer("a", "r", [0], now=0.0, ttl_s=1.0)
    table.offer("b", "r", [1], now=0.0, ttl_s=2.0)
    table.offer("c", "r", [2], now=0.0, ttl_s=3.0)
    assert table.next_deadline() == 1.0
    table.abort("a", now=0.1)
    assert table.next_deadline() == 2.0
    table.fail("c", now=0.1, reason="x")
    assert table.next_deadline() == 2.0
    table.complete("b", now=0.1)
    assert table.next_deadline() is None


def test_reused_transfer_id_keeps_its_own_deadline():
    """A stale heap entry of an ended lease must not expire a new lease of the same id."""
    table = LeaseTable(default_ttl_s=10.0)
    table.offer("t", "r1", [0], now=0.0, ttl_s=1.0)
    table.complete("t", now=0.5)
    table.offer("t", "r2", [0], now=0.6)                   # deadline 10.6
    assert table.expire(now=5.0) == []
    assert table.next_deadline() == 10.6
    assert [e.req_id for e in table.expire(now=10.6)] == ["r2"]


# -- TTL -------------------------------------------------------------------------------

def test_ttl_override_and_default():
    table = LeaseTable(default_ttl_s=2.5)
    table.offer("d", "r", [0], now=1.0)
    table.offer("o", "r", [1], now=1.0, ttl_s=0.25)
    assert table.get("d").deadline == 3.5
    assert table.get("o").deadline == 1.25
    assert [e.transfer_id for e in table.expire(now=1.25)] == ["o"]


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan"), float("inf")])
def test_bad_ttl_rejected(ttl):
    with pytest.raises(ValueError):
        LeaseTable(default_ttl_s=ttl)
    table = LeaseTable()
    table.offer("keep", "r", [9], now=0.0)
    before = snapshot(table, ["keep", "t"])
    with pytest.raises(ValueError):
        table.offer("t", "r", [0], now=0.0, ttl_s=ttl)
    assert snapshot(table, ["keep", "t"]) == before


# -- rejected offers change nothing -------------------------------------------------------

def test_duplicate_transfer_id_rejected_with_nothing_changed():
    table = LeaseTable()
    table.offer("t1", "r1", [0, 1], now=0.0)
    table.start("t1", now=0.5)
    before = snapshot(table, ["t1"])
    with pytest.raises(ValueError, match="t1"):
        table.offer("t1", "r2", [5, 6], now=1.0)
    assert snapshot(table, ["t1"]) == before
    assert table.abort_request("r2", now=1.0) == []
    table.offer("t2", "r2", [5, 6], now=1.0)               # the blocks were not taken


def test_a_block_listed_twice_is_refused_with_nothing_changed():
    table = LeaseTable()
    table.offer("t1", "r1", [0, 1, 2], now=0.0)
    before = snapshot(table, ["t1", "t2"])
    with pytest.raises(ValueError, match="twice"):
        table.offer("t2", "r2", [9, 9], now=1.0)
    assert snapshot(table, ["t1", "t2"]) == before


def test_a_shared_prefix_is_held_until_its_last_lease_ends():
    """Two prompts over one cached prefix: their leases share its blocks, each ends once with
    all of its own blocks, and a shared block is held until the last lease over it ends."""
    table = LeaseTable()
    table.offer("a", "ra", [0, 1, 2], now=0.0)
    table.offer("b", "rb", [0, 1, 5], now=0.5)
    assert table.held_blocks() == 4 and table.stats().num_held_blocks == 4
    assert table.complete("a", now=1.0).block_ids == (0, 1, 2)
    assert table.holds(0) and table.holds(1) and not table.holds(2) and table.holds(5)
    assert table.held_blocks() == 3
    assert table.abort("b", now=2.0).block_ids == (0, 1, 5)
    assert table.held_blocks() == 0 and not table.holds(0)


# -- start / progress edge cases --------------------------------------------------------------

def test_start_is_one_receiver_only_and_unknown_is_refused():
    table = LeaseTable()
    assert table.start("nope", now=0.0) is False
    table.offer("t1", "r1", [0], now=0.0)
    assert table.start("t1", now=1.0) is True
    before = snapshot(table, ["t1"])
    assert table.start("t1", now=2.0) is False             # a second receiver
    assert snapshot(table, ["t1"]) == before
    assert table.get("t1").started_at == 1.0


def test_progress_only_while_in_flight_and_never_backwards():
    table = LeaseTable()
    table.offer("t1", "r1", [0], now=0.0)
    assert table.progress("t1", now=0.1, bytes_done=10) is False
    assert table.get("t1").bytes_done == 0
    table.start("t1", now=0.2)
    assert table.progress("t1", now=0.3, bytes_done=100)
    assert table.progress("t1", now=0.4, bytes_done=40)    # stale, out of order
    assert table.get("t1").bytes_done == 100
    with pytest.raises(ValueError):
        table.progress("t1", now=0.5, bytes_done=-1)
    table.offer("t2", "r2", [1], now=0.0)
    table.start("t2", now=0.1)
    table.progress("t2", now=0.2, bytes_done=7)
    table.fail("t1", now=1.0, reason="x")
    assert table.stats().bytes_done == 107


def test_live_state_is_only_offered_or_in_flight():
    assert [s for s in LeaseState if not s.is_terminal] == list(LIVE)


def test_memory_stays_bounded_after_many_short_leases():
    """Leases that end before their deadline leave stale heap entries (lazy deletion);
    they must not pile up. White-box: looks at the heap's length."""
    table = LeaseTable(default_ttl_s=1000.0)
    table.offer("anchor", "r", [99], now=0.0)              # keeps the stale entries off the top
    for i in range(5000):
        table.offer(i, i, [i % 4], now=float(i))
        table.complete(i, now=float(i))
        assert len(table._heap) <= 2 * table.live() + LeaseTable._COMPACT_SLACK + 1
    assert table.live() == 1 and table.next_deadline() == 1000.0


# -- randomized property test ----------------------------------------------------------------

def _check_invariants(table: LeaseTable, bm: BlockManager, model: dict, now: float, counts: dict) -> None:
    holders: dict[int, int] = {}
    for m in model.values():
        for b in m["blocks"]:
            holders[b] = holders.get(b, 0) + 1
    assert table.held_blocks() == bm.num_used_blocks == len(holders)
    assert all(table.holds(b) and bm.ref_count(b) == n for b, n in holders.items())
    assert table.live() == len(model)
    for transfer_id, m in model.items():
        view = table.get(transfer_id)
        assert view is not None and view.state is m["state"]
        assert view.deadline == m["deadline"] and view.block_ids == m["blocks"]
    expected_next = min((m["deadline"] for m in model.values()), default=None)
    assert table.next_deadline() == expected_next
    stats = table.stats()
    assert stats.by_outcome() == counts
    assert stats.num_live == len(model) and stats.num_held_blocks == bm.num_used_blocks


@pytest.mark.parametrize("seed", range(4))
def test_random_ops_free_every_block_exactly_once(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=64, block_size=4)
    table = LeaseTable(default_ttl_s=5.0)
    model: dict[int, dict] = {}                            # live leases, as the test sees them
    ended_ids: list[int] = []
    counts = {s: 0 for s in LeaseState if s.is_terminal}
    now = 0.0
    next_id = 0

    def settle(ends: list[LeaseEnd], outcome: LeaseState | None = None) -> None:
        for end in ends:
            assert end.transfer_id in model, "ended a lease twice or one never offered"
            m = model.pop(end.transfer_id)
            assert end.block_ids == m["blocks"] and end.req_id == m["req_id"]
            if outcome is not None:
                assert end.outcome is outcome
            counts[end.outcome] += 1
            ended_ids.append(end.transfer_id)
            bm.free(end.block_ids)                         # raises on a double free

    for _ in range(3000):
        op = rng.random()
        live_ids = list(model)
        if op < 0.25:                                      # offer a fresh allocation
            num_tokens = rng.randint(1, 24)
            if bm.can_allocate(num_tokens):
                blocks = bm.allocate(num_tokens)
                ttl = rng.choice([None, rng.uniform(0.5, 8.0)])
                req_id = rng.randrange(12)
                table.offer(next_id, req_id, blocks, now, ttl_s=ttl)
                model[next_id] = {"blocks": tuple(blocks), "req_id": req_id, "state": LeaseState.OFFERED,
                                  "deadline": now + (5.0 if ttl is None else ttl)}
                next_id += 1
        elif op < 0.30 and live_ids:                       # a second lease over held blocks (a shared prefix)
            shared = list(model[rng.choice(live_ids)]["blocks"][:rng.randint(1, 3)])
            bm.share(shared)                               # its own reference, freed when it ends
            req_id = rng.randrange(12)
            table.offer(next_id, req_id, shared, now)
            model[next_id] = {"blocks": tuple(shared), "req_id": req_id, "state": LeaseState.OFFERED,
                              "deadline": now + 5.0}
            next_id += 1
            before = snapshot(table, list(model))
            with pytest.raises(ValueError):
                table.offer(rng.choice(list(model)), 99, [], now)   # a live transfer id
            assert snapshot(table, list(model)) == before
        elif op < 0.45:                                    # a receiver starts
            transfer_id = rng.choice(live_ids + ended_ids[-5:] + [next_id + 1])
            m = model.get(transfer_id)
            ok = m is not None and m["state"] is LeaseState.OFFERED and now < m["deadline"]
            assert table.start(transfer_id, now) is ok
            if ok:
                m["state"] = LeaseState.IN_FLIGHT
        elif op < 0.50 and live_ids:
            transfer_id = rng.choice(live_ids)
            ok = model[transfer_id]["state"] is LeaseState.IN_FLIGHT
            assert table.progress(transfer_id, now, rng.randrange(10**6)) is ok
        elif op < 0.70:                                    # an outcome, maybe a late one
            transfer_id = rng.choice(live_ids + ended_ids[-5:]) if live_ids or ended_ids else 0
            kind = rng.choice(["complete", "fail", "abort"])
            if kind == "complete":
                end, outcome = table.complete(transfer_id, now), LeaseState.DONE
            elif kind == "fail":
                end, outcome = table.fail(transfer_id, now, "boom"), LeaseState.FAILED
            else:
                end, outcome = table.abort(transfer_id, now), LeaseState.ABORTED
            if transfer_id in model:
                settle([end], outcome)
            else:
                assert end is None
        elif op < 0.75:                                    # client cancel
            req_id = rng.randrange(12)
            expected = [t for t, m in model.items() if m["req_id"] == req_id]
            ends = table.abort_request(req_id, now)
            assert sorted(e.transfer_id for e in ends) == sorted(expected)
            settle(ends, LeaseState.ABORTED)
        elif op < 0.85:                                    # the step loop's expiry sweep
            due = sorted((m["deadline"], t) for t, m in model.items() if m["deadline"] <= now)
            ends = table.expire(now)
            assert [(model[e.transfer_id]["deadline"], e.transfer_id) for e in ends] == due
            settle(ends, LeaseState.EXPIRED)
            assert all(m["deadline"] > now for m in model.values())
        elif op < 0.90 and model:                          # land exactly on a deadline
            now = max(now, table.next_deadline())
        else:                                              # time passes
            now += rng.choice([0.0, rng.uniform(0.0, 1.0), rng.uniform(0.0, 4.0)])
        _check_invariants(table, bm, model, now, counts)

    now += 100.0
    settle(table.expire(now), LeaseState.EXPIRED)
    assert model == {} and table.live() == 0 and table.held_blocks() == 0
    assert bm.num_free_blocks == bm.num_blocks
    assert table.next_deadline() is None
    stats = table.stats()
    assert stats.num_offered == next_id == sum(counts.values())
    assert sum(counts.values()) > 200 and all(counts[s] > 0 for s in counts)
