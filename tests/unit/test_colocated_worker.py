"""The colocated baselines without Ray or gRPC: the config keys, the router's pick, the worker.

The worker is built by `cluster.worker_factory.build_worker("colocated", ...)`
on a tiny random Llama (float32, block size 4) and stepped by hand, playing
the router's part; the oracle is `engine.LLM.generate` on the same model.
Every loop is bounded; every test ends with no block held.
"""
from __future__ import annotations

import random
import time

import pytest

from cluster.config import CHUNKED_DEFAULT_BUDGET, ClusterConfig, ConfigError, load_config
from cluster.worker_factory import build_worker
from engine import LLM, SamplingParams
from engine.kv_cache import KVCache
from engine.model_config import load_model_config
from engine.model_runner import parse_dtype
from protos import pdcluster_pb2 as pb
from protos import worker_pb2 as wpb
from router.dispatch import InstanceView, pick_colocated
from tests.helpers import save_tiny_model

BLOCK_SIZE = 4
VOCAB = 512
MODES = ["colocated", "colocated_chunked"]


# -- config --------------------------------------------------------------------------------------
def test_mode_defaults_to_disaggregated_and_selects_the_pools():
    cfg = ClusterConfig().check()
    assert cfg.mode == "disaggregated" and not cfg.is_colocated
    assert list(cfg.pools()) == ["prefill", "decode"]
    co = load_config(None, {"mode": "colocated", "colocated": {"num_instances": 2}})
    assert co.is_colocated and list(co.pools()) == ["colocated"] and co.colocated.num_instances == 2
    assert co.colocated.budget("colocated") == 4096
    assert co.colocated.budget("colocated_chunked") == CHUNKED_DEFAULT_BUDGET
    fixed = load_config(None, {"mode": "colocated_chunked", "colocated": {"max_num_batched_tokens": 256}})
    assert fixed.colocated.budget(fixed.mode) == 256


@pytest.mark.parametrize("data,needle", [
    ({"mode": "split"}, "mode must be one of"),
    ({"mode": 3}, "mode must be str"),
    ({"colocated": {"num_instances": 0}}, "colocated.num_instances must be >= 1"),
    ({"colocated": {"max_num_batched_tokens": 0}}, "colocated.max_num_batched_tokens must be >= 1"),
    ({"colocated": {"tp_size": 2}}, "colocated.tp_size/pp_size"),
    ({"colocated": {"max_num_seqs": 64, "max_num_batched_tokens": 32}, "mode": "colocated_chunked"},
     "colocated.max_num_batched_tokens (32) must be >= colocated.max_num_seqs (64)"),
    ({"colocated": {"chunk": 1}}, "unknown config key colocated.chunk"),
])
def test_bad_mode_settings_name_the_key(data, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, data)
    assert needle in str(err.value)


# -- dispatch --------------------------------------------------------------------------------------
def _c(name, queued=0, active=0, available=True, role="colocated"):
    return InstanceView(name, role, queued_tokens=queued, active=active, available=available)


def test_pick_colocated_least_queued_prompt_tokens_plus_running():
    assert pick_colocated([_c("c0", queued=100), _c("c1", active=3)]).name == "c1"
    assert pick_colocated([_c("c0", queued=2, active=1), _c("c1", active=2)]).name == "c1"   # 3 > 2
    assert pick_colocated([_c("c0"), _c("c1")]).name == "c0"                     # ties by name
    assert pick_colocated([_c("c0", available=False), _c("c1", queued=900)]).name == "c1"
    assert pick_colocated([_c("p0", role="prefill"), _c("d0", role="decode")]) is None


# -- the worker ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-colocated")
    save_tiny_model(str(path), arch="llama", seed=5, vocab_size=VOCAB)
    return str(path)


def _gb_for(model_dir: str, num_blocks: int) -> float:
    mc = load_model_config(model_dir)
    per_block = KVCache.bytes_per_block(mc.num_layers, BLOCK_SIZE, mc.num_kv_heads, mc.head_dim,
                                        parse_dtype("float32"))
    return (num_blocks + 0.5) * per_block / 2**30


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    return LLM(model=tiny_dir, dtype="float32", block_size=BLOCK_SIZE,
               kv_cache_memory_gb=_gb_for(tiny_dir, 512), num_threads=1)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


class Router:
    """The router's part: PrefillWork in, PrefillDone (first token) then Tokens out."""

    def __init__(self, model_dir: str, mode: str, num_blocks: int = 256, budget: int | None = 16,
                 max_num_seqs: int = 8) -> None:
        cfg = load_config(None, {"mode": mode, "model": {"path": model_dir, "dtype": "float32"},
                                 "colocated": {"block_size": BLOCK_SIZE, "max_num_seqs": max_num_seqs,
                                               "kv_cache_memory_gb": _gb_for(model_dir, num_blocks),
                                               "max_num_batched_tokens": budget}})
        self.worker = build_worker("colocated", "c0", cfg, model_dir)
        assert self.worker.blocks.num_blocks == num_blocks
        self.tokens: dict[str, list[int]] = {}
        self.done: dict[str, wpb.PrefillDone] = {}
        self.finish: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    def submit(self, req_id: str, prompt: list[int], max_tokens: int, **sampling) -> None:
        sp = pb.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, **sampling)
        work = wpb.PrefillWork(req_id=req_id, prompt_token_ids=prompt, sampling=sp)
        self.worker.handle(wpb.ToWorker(prefill=work), time.monotonic())

    def abort(self, req_id: str) -> None:
        self.worker.handle(wpb.ToWorker(abort=wpb.Abort(req_id=req_id)), time.monotonic())

    def step(self) -> wpb.FromWorker | None:
        out = self.worker.step(time.monotonic())
        if out is None:
            return None
        assert out.instance == "c0" and out.HasField("load")
        for d in out.prefilled:
            assert d.req_id not in self.done and not d.offer, "one first token, no KV offer"
            self.done[d.req_id], self.tokens[d.req_id] = d, [d.first_token_id]
            if d.finish_reason:
                self.finish[d.req_id] = d.finish_reason
        for t in out.tokens:
            assert t.req_id in self.done and t.req_id not in self.finish and not t.transfer_s
            self.tokens[t.req_id].extend(t.token_ids)
            if t.finish_reason:
                self.finish[t.req_id] = t.finish_reason
        for f in out.failed:
            self.failed[f.req_id] = f.error
        return out

    def run_to_end(self, req_ids, max_steps: int = 3000, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for _ in range(max_steps):
            if all(r in self.finish or r in self.failed for r in req_ids) or time.monotonic() > deadline:
                break
            self.step()
        assert all(r in self.finish or r in self.failed for r in req_ids), (self.finish, self.failed)

    def close(self) -> None:
        assert self.worker.blocks.num_free_blocks == self.worker.blocks.num_blocks, "a block leaked"
        assert self.worker.is_idle() and self.worker.next_wakeup(0.0) is None
        self.worker.close()


@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_match_the_engine_with_requests_arriving_mid_decode(tiny_dir, oracle, mode):
    prompts = [_prompt(n, seed=n) for n in (3, 70, 9, 41)]
    want = [o.token_ids for o in oracle.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0,
                                                                         ignore_eos=True))]
    r = Router(tiny_dir, mode)
    try:
        r.submit("a", prompts[0], 10)
        for _ in range(3):
            r.step()                          # "a" is decoding when the others arrive
        for i, p in enumerate(prompts[1:], 1):
            r.submit(f"r{i}", p, 10)
        r.run_to_end(["a", "r1", "r2", "r3"])
        assert not r.failed
        assert [r.tokens[k] for k in ("a", "r1", "r2", "r3")] == want
        assert set(r.finish.values()) == {"length"}
        d = r.done["r1"]
        assert d.prefill_s > 0 and d.queue_s >= 0
        load = r.worker.load()
        assert load.num_steps > 0 and load.num_running == 0 and load.queued_prompt_tokens == 0
    finally:
        r.close()


@pytest.mark.parametrize("mode", MODES)
def test_abort_bad_input_duplicate_and_one_token_requests(tiny_dir, mode):
    r = Router(tiny_dir, mode)
    try:
        r.submit("long", _prompt(50, 1), 100)
        r.submit("waits", _prompt(30, 2), 100)
        r.step()
        assert r.worker.blocks.num_free_blocks < r.worker.blocks.num_blocks
        r.abort("long")
        r.abort("waits")
        r.abort("never-seen")
        r.step()
        assert r.worker.blocks.num_free_blocks == r.worker.blocks.num_blocks
        r.submit("bad", [1, VOCAB + 7], 4)
        r.submit("one", _prompt(5, 3), 1)
        r.submit("one", _prompt(5, 3), 1)    # a second request with the same id is refused
        r.run_to_end(["bad", "one"])
        assert "outside the vocabulary" in r.failed["bad"]
        assert "already running" in r.failed["one"]
        assert r.finish["one"] == "length" and len(r.tokens["one"]) == 1
        r.worker.handle(wpb.ToWorker(decode=wpb.DecodeWork(req_id="x")), time.monotonic())
        r.step()
        assert "cannot take 'decode'" in r.failed["x"]
    finally:
        r.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_small_cache_preempts_and_still_matches_the_engine(tiny_dir, oracle, mode):
    prompts = [_prompt(n, seed=100 + n) for n in (20, 24, 28)]
    want = [o.token_ids for o in oracle.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0,
                                                                         ignore_eos=True))]
    r = Router(tiny_dir, mode, num_blocks=30)   # 18 + 3 * 6 blocks would be needed at the end
    try:
        for i, p in enumerate(prompts):
            r.submit(f"r{i}", p, 24)
        r.run_to_end(["r0", "r1", "r2"])
        assert [r.tokens[f"r{i}"] for i in range(3)] == want
        assert not r.failed
    finally:
        r.close()
