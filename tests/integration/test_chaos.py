"""Chaos: ~200 streamed requests of mixed lengths while a random worker is killed every few seconds.

Over 2 prefill + 2 decode instances (small KV caches), every request must
complete within the migration limit with exactly the in-process engine's greedy
tokens, and the pools must be back to full size at the end. Bounded: the run
stops when the requests are done, and each request has a deadline.
"""
from __future__ import annotations

import pytest

from cluster.bench.chaos import DEFAULT_CLUSTER, requests_for, run_chaos
from cluster.config import load_config
from engine import SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NUM_REQUESTS = 200


def test_every_request_survives_random_kills_token_for_token(llm):
    cfg = load_config(None, DEFAULT_CLUSTER)
    requests = requests_for(llm.tokenizer, NUM_REQUESTS, seed=7)
    result = run_chaos(cfg, requests, kill_every_s=6.0, concurrency=16, seed=7, log=lambda *_: None)
    errors = [r.error for r in result.records if r.error]
    assert not errors, errors[:3]
    assert len(result.kills) >= 3, "the chaos loop killed too few workers to mean anything"
    assert sum(1 for r in result.records if r.migrations) >= 1
    want = llm.generate([ids for ids, _ in requests],
                        [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in requests])
    mismatched = [r.index for r, w in zip(result.records, want) if r.token_ids != w.token_ids]
    assert not mismatched, f"{len(mismatched)} requests differ from the engine, e.g. {mismatched[:5]}"
    assert max(r.migrations for r in result.records) <= cfg.router.migration_limit
    assert result.pools_back_to_size
    assert all(k["detect_s"] is not None and k["detect_s"] < 2.0 for k in result.kills), result.kills
