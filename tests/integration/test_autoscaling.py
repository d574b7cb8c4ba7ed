"""Elastic pools on a real cluster: a load that steps low -> high -> low grows and shrinks them.

The `load` policy decides every second on a short window. Under the high load
the pools grow; when it falls they shrink, and a decode instance is removed
while it still decodes live requests, which move to the instance that stays.
Every request's tokens equal the in-process engine's; nothing is left
afterwards: no block, no lease, no /dev/shm segment, no actor.
"""
from __future__ import annotations

import glob
import threading

import pytest

from cluster.client import Client
from cluster.local import Cluster
from engine import SamplingParams
from tests.integration.conftest import cluster_config, stop_and_check_nothing_left, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCALING = {
    "policy": "load", "interval_s": 1.0, "window_s": 4.0,
    "prefill": {"min_instances": 1, "max_instances": 2, "upscale_delay_s": 1.0, "downscale_delay_s": 3.0},
    "decode": {"min_instances": 1, "max_instances": 2, "upscale_delay_s": 1.0, "downscale_delay_s": 3.0},
    "queued_tokens_high": 150, "queued_tokens_low": 40, "kv_use_high": 0.25, "kv_use_low": 0.15,
}


def _requests(llm, n: int, max_tokens: int, salt: int) -> list[tuple[list[int], int]]:
    words = "river stone cloud engine garden signal paper winter copper voice".split()
    out = []
    for i in range(n):
        text = " ".join(words[(i * 7 + j + salt) % len(words)] for j in range(40 + 10 * (i % 5)))
        out.append((llm.tokenizer.encode(f"{salt}-{i}: {text}"), max_tokens))
    return out


def _serve(address: str, reqs, results: dict, key: str) -> list[threading.Thread]:
    def one(i: int, ids: list[int], n: int) -> None:
        with Client(address, timeout_s=300) as c:
            results[(key, i)] = c.complete(token_ids=ids, max_tokens=n, temperature=0.0, ignore_eos=True)
    threads = [threading.Thread(target=one, args=(i, ids, n)) for i, (ids, n) in enumerate(reqs)]
    for t in threads:
        t.start()
    return threads


def test_pools_grow_under_load_and_shrink_after_moving_live_requests(llm):
    cfg = cluster_config(decode={"kv_cache_memory_gb": 0.2}, autoscaling=SCALING, restart={"backoff_s": 0.2})
    cluster = Cluster(cfg, log=lambda *_: None).start()
    seen_pids: set[int] = set()
    done = threading.Event()

    def note_pids() -> None:   # every worker process that ever served, to check /dev/shm at the end
        while not done.wait(0.2):
            seen_pids.update(i["pid"] for i in cluster.infos.values())
    watcher = threading.Thread(target=note_pids, daemon=True)
    watcher.start()
    try:
        results: dict = {}
        low = _requests(llm, 2, 8, salt=1)
        for t in _serve(cluster.address, low, results, "low1"):
            t.join(120)
        # long requests on both decode instances outlive the high load, so the decode instance
        # removed when the pools shrink still holds live requests: two go to decode-0 now...
        tail = _requests(llm, 4, 300, salt=3)
        threads = _serve(cluster.address, tail[:2], results, "tail")
        high = _requests(llm, 16, 64, salt=2)
        threads += _serve(cluster.address, high, results, "high")
        decodes = lambda: sum(1 for i in cluster.infos.values() if i["role"] == "decode")   # noqa: E731
        grown = wait_until(lambda: decodes() == 2, timeout_s=90)
        # ...and two to the new one (it has the most room)
        threads += _serve(cluster.address, tail[2:], results, "tail2")
        for t in threads:
            t.join(300)
        shrunk = wait_until(lambda: len(cluster.infos) == 2, timeout_s=120)
        events = list(cluster.autoscaler.events)
        assert grown, "the pools did not grow under the high load"
        assert shrunk, f"the pools did not shrink back: {cluster.infos.keys()}"
        ups = [e for e in events if e.change > 0]
        downs = [e for e in events if e.change < 0]
        assert ups and downs
        assert any(e.role == "decode" and sum(e.moved.values()) > 0 for e in downs), \
            [e.as_dict(0) for e in events]
        assert all(e.ready_at for e in ups) and any(e.first_work_at for e in ups)
        reqs = {("low1", i): r for i, r in enumerate(low)}
        reqs.update({("high", i): r for i, r in enumerate(high)})
        reqs.update({("tail", i): r for i, r in enumerate(tail[:2])})
        reqs.update({("tail2", i): r for i, r in enumerate(tail[2:])})
        assert set(results) == set(reqs), "a request did not finish"
        want = llm.generate([ids for ids, _ in reqs.values()],
                            [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs.values()])
        got = [results[k].token_ids for k in reqs]
        assert got == [w.token_ids for w in want]
        assert sum(r.migrations for r in results.values()) >= 1
        assert all(n in e.stopped_at for e in downs for n in e.instances)
    finally:
        done.set()
        watcher.join(5)
        stop_and_check_nothing_left(cluster)
    left = [p for pid in seen_pids for p in glob.glob(f"/dev/shm/pdkv-{pid}-*")]
    assert not left, left
