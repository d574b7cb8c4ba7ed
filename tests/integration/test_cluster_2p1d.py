"""Two prefill instances + one decode instance over zmq with layer-wise streaming (early
offers bind the decode instance before prefill runs); admission control under overload."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.client import Client, Overloaded
from cluster.local import Cluster
from engine import LLM, SamplingParams
from tests.integration.conftest import all_blocks_free, cluster_config, stop_and_check_nothing_left, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_ACTIVE = 6


@pytest.fixture(scope="module")
def cluster():
    cfg = cluster_config(prefill={"num_instances": 2}, router={"max_active_requests": MAX_ACTIVE},
                         transfer={"backend": "zmq", "checksum": True, "stream_layers": True})
    c = Cluster(cfg, log=lambda *_: None).start()
    yield c
    stop_and_check_nothing_left(c)


def test_greedy_matches_the_engine_with_both_prefill_instances_used(cluster):
    prompts = [f"Fact number {i} about the moon:" + " It is far away." * i for i in range(MAX_ACTIVE)]
    with Client(cluster.address, timeout_s=120) as client, ThreadPoolExecutor(MAX_ACTIVE) as pool:
        results = list(pool.map(lambda p: client.complete(p, max_tokens=12, temperature=0.0), prompts,
                                timeout=300))
    llm = LLM(dtype="float32", kv_cache_memory_gb=0.1)
    want = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    assert [r.token_ids for r in results] == [w.token_ids for w in want]
    assert {r.prefill_instance for r in results} == {"prefill-0", "prefill-1"}
    assert {r.decode_instance for r in results} == {"decode-0"}
    assert wait_until(lambda: all_blocks_free(cluster))
    # the router forwarded each early offer: decode pulled while prefill ran
    assert cluster.worker_stats()["decode-0"]["num_prefetched"] >= MAX_ACTIVE


def test_a_request_ending_at_prefill_frees_its_early_pull(cluster):
    before = cluster.worker_stats()["decode-0"]["num_prefetched"]
    with Client(cluster.address, timeout_s=120) as client:
        one = client.complete("Tell me about the sea." * 8, max_tokens=1, temperature=0.0)
    assert one.finish_reason == "length" and len(one.token_ids) == 1
    assert wait_until(lambda: all_blocks_free(cluster))   # the router's Abort freed it on decode
    assert cluster.worker_stats()["decode-0"]["num_prefetched"] == before + 1


def test_over_capacity_is_resource_exhausted_and_the_admitted_finish(cluster):
    admitted, started = [], threading.Barrier(MAX_ACTIVE + 1, timeout=120)

    def long_request(i):
        with Client(cluster.address, timeout_s=300) as c:
            stream = c.generate(f"Story {i}:", max_tokens=64, temperature=0.0, ignore_eos=True)
            first = next(stream)
            started.wait()
            admitted.append(len(first.token_ids) + sum(len(x.token_ids) for x in stream))

    threads = [threading.Thread(target=long_request, args=(i,)) for i in range(MAX_ACTIVE)]
    for t in threads:
        t.start()
    started.wait()   # every slot is taken and streaming
    with Client(cluster.address) as extra:
        with pytest.raises(Overloaded) as err:
            extra.complete("one too many", max_tokens=4)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(MAX_ACTIVE) in err.value.message
    for t in threads:
        t.join(300)
    assert admitted == [64] * MAX_ACTIVE
    with Client(cluster.address) as after:   # capacity is back once they finished
        assert len(after.complete("hi again", max_tokens=3, temperature=0.0, ignore_eos=True).token_ids) == 3
    assert wait_until(lambda: all_blocks_free(cluster))
