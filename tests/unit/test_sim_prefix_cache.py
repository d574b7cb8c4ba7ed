"""Prefix caching in the simulator: router/planner/sim_cache.py, and what it does to a multi-turn trace."""
import pytest

from router.planner.goodput import at_rate, unit_rate_requests
from router.planner.profile import profile_from_dict
from router.planner.sim_cache import PrefixCache
from router.planner.simulator import PoolSpec, SimConfig, SimStats, Simulation, simulate
from router.workload import RequestSpec
from tests.unit.test_planner_profile import make_profile_dict

PROFILE = profile_from_dict(make_profile_dict())
BS = 16
ONE = dict(prefill=PoolSpec(1, 1, 1), decode=PoolSpec(1, 1, 1))


def p90(xs):
    xs = sorted(xs)
    return xs[int(0.9 * (len(xs) - 1))]


def conversation(c, start, turns, first=200, answer=30, message=40, gap=5.0):
    """One conversation's turns, each prompt the last prompt + its answer + a new message, `gap` apart."""
    out, prompt = [], first
    for k in range(turns):
        out.append(RequestSpec(start + k * gap, prompt, answer, conversation=c))
        prompt += answer + message
    return out


def test_the_cache_evicts_the_least_recently_released_entry_first_and_fits_the_free_blocks():
    cache = PrefixCache(BS)
    spec = lambda c, n: RequestSpec(0.0, n, 1, conversation=c)   # noqa: E731
    cache.put(1, 64, free_blocks=100)              # 4 blocks
    cache.put(2, 80, free_blocks=100)              # 5 blocks
    cache.put(1, 70, free_blocks=100)              # conversation 1 released again: now the most recent
    assert cache.num_blocks == 9 and list(cache.entries) == [2, 1]
    cache.fit(7)                                   # 7 free blocks left: 2 loses its last 2 blocks
    assert list(cache.entries) == [2, 1] and cache.num_blocks == 7
    assert cache.usable(spec(2, 200)) == 48        # its head is still found (the engine frees last first)
    cache.fit(4)                                   # 4 left: the rest of 2 goes, whole
    assert list(cache.entries) == [1] and cache.num_blocks == 4
    assert cache.usable(spec(1, 200)) == 64        # whole blocks only
    assert cache.usable(spec(1, 64)) == 48         # never the block of the prompt's last token
    assert cache.usable(spec(2, 200)) == 0 and cache.usable(RequestSpec(0.0, 200, 1)) == 0
    cache.claim(spec(1, 200))                      # admitted: its blocks are the request's now
    assert cache.num_blocks == 0 and not cache.entries
    cache.put(3, 10 * BS, free_blocks=4)           # more than fits: its last 6 blocks at once
    assert cache.num_blocks == 4 and cache.usable(spec(3, 200)) == 4 * BS


def test_a_conversation_computes_only_its_new_tokens_on_one_instance():
    # never, one decode instance that keeps each turn's prompt + answer (but the last token)
    reqs = conversation(0, 0.0, 4)
    cfg = SimConfig(prefix_caching=True, block_size=BS)
    on, off = SimStats(), SimStats()
    r_on = simulate("never", PROFILE, reqs, config=cfg, stats=on, decode=PoolSpec(1, 1, 1))
    r_off = simulate("never", PROFILE, reqs, config=SimConfig(block_size=BS), stats=off, decode=PoolSpec(1, 1, 1))
    shared = sum(min((a.prompt_tokens + a.output_tokens - 1) // BS, (b.prompt_tokens - 1) // BS) * BS
                 for a, b in zip(reqs, reqs[1:]))
    assert off.prefill_tokens == sum(r.prompt_tokens for r in reqs) and off.cached_tokens == 0
    assert on.cached_tokens == shared > 0
    assert on.prefill_tokens == off.prefill_tokens - shared
    assert r_on[0].ttft_s == pytest.approx(r_off[0].ttft_s)            # nothing cached yet
    assert all(a.ttft_s < b.ttft_s for a, b in zip(r_on[1:], r_off[1:]))


def test_a_prefill_instance_keeps_the_prompts_it_handed_off():
    # disaggregated: the prefill instance releases a prompt's KV after the pull, not the answer
    reqs = conversation(0, 0.0, 3)
    stats = SimStats()
    simulate("disaggregated", PROFILE, reqs, config=SimConfig(prefix_caching=True, block_size=BS), stats=stats, **ONE)
    assert stats.cached_tokens == sum(min(a.prompt_tokens // BS, (b.prompt_tokens - 1) // BS) * BS
                                      for a, b in zip(reqs, reqs[1:]))


def test_a_pull_moves_only_the_prompt_the_decode_instance_lacks():
    # disaggregated: turn k+1's pull skips what the decode instance kept of turn k (its prompt and
    # answer, but the last token), whole blocks short of the prompt's last token
    reqs = conversation(0, 0.0, 3)
    on, off = SimStats(), SimStats()
    simulate("disaggregated", PROFILE, reqs, config=SimConfig(prefix_caching=True, block_size=BS), stats=on, **ONE)
    simulate("disaggregated", PROFILE, reqs, config=SimConfig(block_size=BS), stats=off, **ONE)
    held = sum(min((a.prompt_tokens + a.output_tokens - 1) // BS, (b.prompt_tokens - 1) // BS) * BS
               for a, b in zip(reqs, reqs[1:]))
    assert off.kv_bytes == sum(r.prompt_tokens for r in reqs) * PROFILE.kv_bytes_per_token
    assert on.kv_bytes == off.kv_bytes - held * PROFILE.kv_bytes_per_token and held > 0


def test_prefix_caching_lowers_the_multiturn_ttft_p90():
    reqs = at_rate(unit_rate_requests("multiturn", 200, seed=0), 4.0)
    assert len({r.conversation for r in reqs}) < len(reqs)
    for mode, pools in (("disaggregated", ONE), ("conditional", ONE), ("never", {"decode": PoolSpec(1, 1, 2)}),
                        ("colocated_chunked", {"colocated": PoolSpec(1, 1, 2)})):
        on, off = SimStats(), SimStats()
        r_on = simulate(mode, PROFILE, reqs, config=SimConfig(prefix_caching=True), stats=on, **pools)
        r_off = simulate(mode, PROFILE, reqs, config=SimConfig(), stats=off, **pools)
        assert on.cached_tokens > 0, mode
        assert on.prefill_tokens == off.prefill_tokens - on.cached_tokens, mode
        assert p90([r.ttft_s for r in r_on]) < p90([r.ttft_s for r in r_off]), mode


def test_a_small_kv_memory_evicts_and_never_caches_more_than_is_free():
    # a rate one instance keeps up with: a turn arrives after the one before it has finished
    reqs = at_rate(unit_rate_requests("multiturn", 160, seed=1), 0.5)
    hits = {}
    for capacity in (2048, 4096, 1_000_000):
        cfg = SimConfig(prefix_caching=True, kv_capacity_tokens=capacity, block_size=BS)
        stats = SimStats()
        sim = Simulation("never", PROFILE, cfg, stats)
        inst = sim.add_instance("decode", PoolSpec(1, 1, 1))
        over = []

        def check(now, r):      # after every request: the cached blocks sit in free ones
            if inst.cache.num_blocks > inst.free_blocks:
                over.append(now)
        sim.on_finish = check
        done = sim.submit(reqs)
        sim.run()
        assert not over and all(r.finished_at > 0 for r in done)
        hits[capacity] = (stats.cached_tokens, stats.evicted_blocks)
    assert hits[2048][1] > hits[4096][1] > hits[1_000_000][1] == 0      # evicted blocks
    assert hits[2048][0] < hits[4096][0] < hits[1_000_000][0]           # cached tokens found


def test_caching_needs_a_one_by_one_instance():
    reqs = conversation(0, 0.0, 3)
    stats = SimStats()
    simulate("disaggregated", PROFILE, reqs,
             config=SimConfig(prefix_caching=True), stats=stats, prefill=PoolSpec(2, 1, 1), decode=PoolSpec(1, 1, 1))
    assert stats.cached_tokens == 0


def test_the_simulation_is_deterministic():
    reqs = at_rate(unit_rate_requests("multiturn", 120, seed=2), 3.0)
    cfg = SimConfig(prefix_caching=True, kv_capacity_tokens=4096)
    runs = []
    for _ in range(2):
        stats = SimStats()
        runs.append((simulate("conditional", PROFILE, reqs, config=cfg, stats=stats, **ONE), stats))
    assert runs[0] == runs[1]
