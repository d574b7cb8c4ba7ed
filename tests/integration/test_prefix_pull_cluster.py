"""A conversation on a disaggregated cluster with prefix caching (Ray + gRPC on 127.0.0.1):
each next turn's KV pull moves only the part of its prompt the decode instance does not hold.

Every turn is prefilled on the prefill instance (disaggregation always) and streamed layer by
layer to the decode instance, which the router tells the prompt with the early offer; the
decode instance kept the earlier turns' prompt and answer, so the pull skips them. Every
answer is the in-process engine's, token for token, and nothing is left at the end.
"""
from __future__ import annotations

import pytest

from cluster.client import Client
from cluster.local import Cluster
from engine import SamplingParams
from tests.integration.conftest import cluster_config, stop_and_check_nothing_left, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GREEDY = dict(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    cfg = cluster_config(prefill={"enable_prefix_caching": True}, decode={"enable_prefix_caching": True},
                         transfer={"stream_layers": True}, router={"disaggregation": "always"})
    c = Cluster(cfg, log=lambda *_: None).start()
    yield c
    stop_and_check_nothing_left(c)


def _decode_counters(cluster) -> tuple[int, int]:
    s = cluster.worker_stats()["decode-0"]
    return s["kv_tokens_skipped"], s["kv_bytes_received"]


def test_next_turns_pull_only_what_the_decode_instance_lacks(cluster, llm):
    history = [{"role": "user", "content": "Name a large river in Europe."}]
    moved = []
    with Client(cluster.address, timeout_s=120) as c:
        for turn, question in enumerate(["How long is it?", "Which sea does it flow into?", None]):
            before = _decode_counters(cluster)
            r = c.complete(messages=history, **GREEDY)
            ids = llm.apply_chat_template(history)
            assert r.token_ids == llm.generate([ids], SamplingParams(**GREEDY))[0].token_ids, f"turn {turn}"
            assert r.prefill_instance == "prefill-0" and r.decode_instance == "decode-0"
            assert wait_until(lambda: all(s["idle"] for s in cluster.worker_stats().values()), timeout_s=30)
            after = _decode_counters(cluster)
            moved.append((len(ids), after[0] - before[0], after[1] - before[1]))
            if question is not None:
                history += [{"role": "assistant", "content": r.text}, {"role": "user", "content": question}]
    (n1, skip1, bytes1), *later = moved
    per_token = bytes1 / n1
    assert skip1 == 0 and per_token > 0                                  # the first turn moves whole
    for n, skip, nbytes in later:
        assert skip > n / 2, (n, skip)                                   # most of it was held
        assert nbytes == (n - skip) * per_token                          # only the rest moved
