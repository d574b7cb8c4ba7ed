"""The router's core moving requests off dead instances, over real workers stepped in-process.

Two prefill and two decode workers (tiny random Llama, float32, zmq KV transfer)
are driven by a loop that plays the worker hosts: it hands each worker its
commands, steps it and gives its replies to `RouterCore.on_worker_message`.
Killing an instance here means: its loop stops, its process would be gone
(the worker is closed, its replies dropped) and the core hears
`instance_died`, as the cluster tells it when Ray reports the death. The
oracle is `engine.LLM.generate` on the same model: every request, moved or
not, must stream exactly the oracle's tokens, none lost or repeated.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from cluster.config import load_config
from cluster.worker_factory import build_worker
from engine import SamplingParams
from protos import pdcluster_pb2 as pb
from protos import worker_pb2 as wpb
from router.admission import Admission, ModelInfo
from router.core import InstanceInfo, RouterCore
from router.errors import RequestError, Status
from tests.unit.test_workers_in_process import BLOCK_SIZE, VOCAB, _gb_for, _prompt, oracle, tiny_dir  # noqa: F401

pytestmark = pytest.mark.slow     # builds four tiny engines per test


class InProcessLinks:
    """The router's links (router/links.py) to workers in this process: commands go to an inbox."""

    def __init__(self) -> None:
        self.inbox: dict[str, list[wpb.ToWorker]] = {}

    def connect(self, name: str, command_endpoint: str) -> None:
        self.inbox[name] = []

    def disconnect(self, name: str) -> None:
        self.inbox.pop(name, None)

    def send(self, name: str, msg: wpb.ToWorker) -> bool:
        box = self.inbox.get(name)
        if box is None:
            return False
        box.append(msg)
        return True


class Cluster:
    """Workers by name, stepped by `run` until every request is done (bounded)."""

    def __init__(self, model_dir: str, migration_limit: int = 3, num_prefill: int = 2, num_decode: int = 2,
                 on_failure: str = "recompute") -> None:
        self.cfg = load_config(None, {
            "model": {"path": model_dir, "dtype": "float32"},
            "prefill": {"block_size": BLOCK_SIZE, "kv_cache_memory_gb": _gb_for(model_dir, 64)},
            "decode": {"block_size": BLOCK_SIZE, "kv_cache_memory_gb": _gb_for(model_dir, 64)},
            "transfer": {"backend": "zmq", "on_failure": on_failure},
            "router": {"migration_limit": migration_limit, "request_timeout_s": 30.0}})
        self.links = InProcessLinks()
        model = ModelInfo(model_dir, VOCAB, 1024, 64, BLOCK_SIZE, "zmq")
        self.core = RouterCore(self.cfg.router, Admission(model, None), self.links)
        self.workers = {}
        for role, n in (("prefill", num_prefill), ("decode", num_decode)):
            for i in range(n):
                self.add(role, f"{role}-{i}")
        self.dead: set[str] = set()

    def add(self, role: str, name: str) -> None:
        w = build_worker(role, name, self.cfg, self.cfg.model.path)
        self.workers[name] = w
        endpoint = w.sender.endpoint if role == "prefill" else ""
        self.core.add_instance(InstanceInfo(name, role, "tp1-pp1", f"inproc://{name}", endpoint))

    def kill(self, name: str, replacing: bool = False) -> None:
        self.dead.add(name)
        self.workers.pop(name).close()
        self.core.instance_died(name, "killed by the test", replacing=replacing)

    def step_all(self) -> None:
        now = time.monotonic()
        for name, w in list(self.workers.items()):
            for msg in self.links.inbox.get(name, [])[:]:
                self.links.inbox[name].remove(msg)
                w.handle(msg, now)
            out = w.step(now)
            if out is not None:
                self.core.on_worker_message(out)

    def close(self) -> None:
        for w in self.workers.values():
            assert w.blocks.num_free_blocks == w.blocks.num_blocks, f"{w.name} leaked blocks"
            w.close()


async def _collect(core: RouterCore, ids: list[int], max_tokens: int, events: list | None = None,
                   seed: int | None = None, temperature: float = 0.0):
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True)
    if seed is not None:
        sampling.seed = seed
    st = core.admit(ids, SamplingParams.from_message(sampling), sampling)
    tokens, final = [], None
    try:
        async for response in core.stream(st):
            if response.HasField("chunk"):
                tokens.extend(response.chunk.token_ids)
                if events is not None:
                    events.append((st.req_id, len(tokens)))
            else:
                final = response.final
    finally:
        core.end(st)
    return tokens, final


async def _drive(cluster: Cluster, tasks: list[asyncio.Task], hook=None, max_s: float = 60.0) -> None:
    """Step the workers until every request task is done; `hook()` runs between rounds."""
    deadline = time.monotonic() + max_s
    while not all(t.done() for t in tasks):
        assert time.monotonic() < deadline, "requests did not finish in time"
        cluster.step_all()
        if hook is not None:
            hook()
        await asyncio.sleep(0)


def _run(cluster: Cluster, prompts: list[list[int]], max_tokens: int, hook_factory=None, **kw):
    async def main():
        events: list = []
        tasks = [asyncio.ensure_future(_collect(cluster.core, p, max_tokens, events, **kw)) for p in prompts]
        await _drive(cluster, tasks, hook_factory(cluster, events) if hook_factory else None)
        return [t.result() for t in tasks]
    return asyncio.run(main())


def _expected(oracle, prompts, max_tokens, **kw):
    outs = oracle.generate([list(p) for p in prompts],
                           SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw))
    return [o.token_ids for o in outs]


def test_undisturbed_requests_match_the_engine(tiny_dir, oracle):
    c = Cluster(tiny_dir)
    try:
        prompts = [_prompt(9 + i, seed=i) for i in range(4)]
        results = _run(c, prompts, 12)
        assert [t for t, _ in results] == _expected(oracle, prompts, 12)
        assert all(f.migrations == 0 and f.finish_reason == "length" for _, f in results)
        assert c.core.num_migrations == 0 and not c.core.requests
    finally:
        c.close()


def test_decode_instance_dies_mid_stream_and_the_stream_goes_on_token_identical(tiny_dir, oracle):
    c = Cluster(tiny_dir)
    try:
        prompts = [_prompt(11 + i, seed=10 + i) for i in range(4)]

        def hook(cluster, events):
            def kill_when_streaming():   # once some request has 5 tokens out, its decode instance dies
                if "decode-0" in cluster.workers and any(n >= 5 for _, n in events):
                    busy = [st for st in cluster.core.requests.values() if st.decode == "decode-0"]
                    if busy:
                        cluster.kill("decode-0")
            return kill_when_streaming
        results = _run(c, prompts, 16, hook)
        assert [t for t, _ in results] == _expected(oracle, prompts, 16)
        assert "decode-0" in c.dead and c.core.num_migrations >= 1
        moved = [f for _, f in results if f.migrations]
        assert moved and all(f.decode_instance == "decode-1" for f in moved)
        assert all(f.completion_tokens == 16 for _, f in results)
    finally:
        c.close()


def test_prefill_instance_dies_with_requests_queued(tiny_dir, oracle):
    c = Cluster(tiny_dir)
    try:
        prompts = [_prompt(20, seed=30 + i) for i in range(4)]

        async def main():
            tasks = [asyncio.ensure_future(_collect(c.core, p, 8)) for p in prompts]
            await asyncio.sleep(0)   # every request dispatched, none stepped yet
            queued = [st for st in c.core.requests.values() if st.prefill == "prefill-0"]
            assert queued
            c.links.inbox["prefill-0"].clear()   # they reached it: it holds them...
            c.kill("prefill-0")                  # ...and dies before its first step
            await _drive(c, tasks)
            return [t.result() for t in tasks]
        results = asyncio.run(main())
        assert [t for t, _ in results] == _expected(oracle, prompts, 8)
        assert all(f.prefill_instance == "prefill-1" for _, f in results)
        assert sum(f.migrations for _, f in results) >= 1
    finally:
        c.close()


def test_seeded_sampling_is_unchanged_by_a_move(tiny_dir, oracle):
    c = Cluster(tiny_dir)
    try:
        prompts = [_prompt(13, seed=50), _prompt(7, seed=51)]
        kw = dict(seed=1234, temperature=0.8)

        def hook(cluster, events):
            def kill_when_streaming():
                if "decode-0" in cluster.workers and any(n >= 4 for _, n in events):
                    if any(st.decode == "decode-0" for st in cluster.core.requests.values()):
                        cluster.kill("decode-0")
            return kill_when_streaming
        results = _run(c, prompts, 12, hook, **kw)
        outs = oracle.generate([list(p) for p in prompts],
                               SamplingParams(max_tokens=12, ignore_eos=True, **kw))
        assert [t for t, _ in results] == [o.token_ids for o in outs]
        assert c.core.num_migrations >= 1
    finally:
        c.close()


def test_past_the_migration_limit_a_request_fails_unavailable_saying_why(tiny_dir):
    c = Cluster(tiny_dir, migration_limit=0)
    try:
        def hook(cluster, events):
            def kill():
                if "decode-0" in cluster.workers and events:
                    if any(st.decode == "decode-0" for st in cluster.core.requests.values()):
                        cluster.kill("decode-0")
            return kill

        async def main():
            events: list = []
            tasks = [asyncio.ensure_future(_collect(c.core, _prompt(9, seed=60 + i), 20, events))
                     for i in range(2)]
            await _drive(c, tasks, hook(c, events))
            return [t.exception() for t in tasks]
        errors = [e for e in asyncio.run(main()) if e is not None]
        assert errors and all(isinstance(e, RequestError) and e.status is Status.UNAVAILABLE for e in errors)
        assert all("decode-0 died" in e.message and "migration_limit" in e.message for e in errors)
        assert not c.core.requests
    finally:
        c.close()


def test_a_request_waits_for_a_replacement_when_its_pool_is_empty(tiny_dir, oracle):
    c = Cluster(tiny_dir, num_decode=1)
    try:
        prompts = [_prompt(10, seed=70)]
        state = {"replaced": False}

        def hook(cluster, events):
            def kill_then_replace():
                if "decode-0" in cluster.workers and len(events) >= 3:
                    cluster.kill("decode-0", replacing=True)
                elif "decode-0" in cluster.dead and not state["replaced"]:
                    st = next(iter(cluster.core.requests.values()))
                    if st.waiting_for_instance or st.pending_decode is not None:
                        state["replaced"] = True
                        cluster.add("decode", "decode-2")
            return kill_then_replace
        results = _run(c, prompts, 10, hook)
        assert [t for t, _ in results] == _expected(oracle, prompts, 10)
        assert state["replaced"] and results[0][1].decode_instance == "decode-2"
    finally:
        c.close()


def test_no_instance_and_none_coming_is_unavailable_at_once(tiny_dir):
    c = Cluster(tiny_dir, num_prefill=1, num_decode=1)
    try:
        c.kill("prefill-0")
        with pytest.raises(RequestError, match="no live prefill instance") as e:
            c.core.admit([5, 6, 7], SamplingParams(max_tokens=2), pb.SamplingParams(max_tokens=2))
        assert e.value.status is Status.UNAVAILABLE
    finally:
        c.close()


@pytest.mark.parametrize("policy", ["recompute", "reprefill"])
def test_prefill_dies_with_kv_leased_and_the_policy_recovers(tiny_dir, oracle, policy):
    c = Cluster(tiny_dir, on_failure=policy)
    try:
        prompts = [_prompt(18 + i, seed=80 + i) for i in range(4)]

        def hook(cluster, events):
            def kill_while_leased():   # prefill-0 handed KV offers out, nobody has pulled them yet
                w = cluster.workers.get("prefill-0")
                if w is not None and w.load().num_leases:
                    cluster.kill("prefill-0")
            return kill_while_leased
        results = _run(c, prompts, 10, hook)
        assert [t for t, _ in results] == _expected(oracle, prompts, 10)
        assert "prefill-0" in c.dead
        moved = sum(f.migrations for _, f in results)
        assert (moved >= 1) if policy == "reprefill" else (moved == 0)
    finally:
        c.close()


def test_prefill_dies_with_kv_leased_and_policy_fail_fails_the_request(tiny_dir):
    c = Cluster(tiny_dir, on_failure="fail")
    try:
        def hook(cluster, events):
            def kill_while_leased():
                w = cluster.workers.get("prefill-0")
                if w is not None and w.load().num_leases:
                    cluster.kill("prefill-0")
            return kill_while_leased

        async def main():
            tasks = [asyncio.ensure_future(_collect(c.core, _prompt(16, seed=90 + i), 6)) for i in range(4)]
            await _drive(c, tasks, hook(c, []))
            return [t.exception() for t in tasks]
        errors = [e for e in asyncio.run(main()) if e is not None]
        assert errors and all(isinstance(e, RequestError) for e in errors)
        assert not c.core.requests
    finally:
        c.close()


def test_an_instance_whose_steps_fail_loses_its_requests_to_others_and_leaves_rotation(tiny_dir, oracle):
    c = Cluster(tiny_dir)
    try:
        broken = c.workers["decode-0"].runner

        def fail(plan, on_layer=None):
            raise RuntimeError("the device fell over")
        broken.execute = fail
        prompts = [_prompt(9 + i, seed=100 + i) for i in range(6)]
        results = _run(c, prompts, 8)
        assert [t for t, _ in results] == _expected(oracle, prompts, 8)
        assert all(f.decode_instance == "decode-1" for _, f in results)
        assert c.core.views["decode-0"].num_failed >= c.cfg.router.breaker_failures
        assert c.core.instance_status(c.core.views["decode-0"]) == "out_of_rotation"
    finally:
        c.workers["decode-0"].runner.execute = lambda plan, on_layer=None: None
        c.close()
