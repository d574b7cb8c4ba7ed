"""Real workers stepped in this process, driven through the router's core (no Ray, no gRPC).

A loop plays the worker hosts: it hands each worker its commands, steps it and
gives its replies to `RouterCore.on_worker_message`. Killing an instance here
means: its loop stops, its process would be gone (the worker is closed, its
replies dropped) and the core hears `instance_died`, as the cluster tells it
when Ray reports the death. Tests compare what streams with `engine.LLM`.
"""
from __future__ import annotations

import asyncio
import time

from cluster.config import load_config
from cluster.worker_factory import build_worker
from engine import SamplingParams
from protos import pdcluster_pb2 as pb
from protos import worker_pb2 as wpb
from router.admission import Admission, ModelInfo
from router.core import InstanceInfo, RouterCore
from tests.worker_pair import BLOCK_SIZE, VOCAB, gb_for


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
                 on_failure: str = "recompute", extra: dict | None = None, conditional=None) -> None:
        """`extra`: config sections merged over the defaults here; `conditional`: the router's
        policy for router.disaggregation conditional / never."""
        base = {
            "model": {"path": model_dir, "dtype": "float32"},
            "prefill": {"block_size": BLOCK_SIZE, "kv_cache_memory_gb": gb_for(model_dir, 64)},
            "decode": {"block_size": BLOCK_SIZE, "kv_cache_memory_gb": gb_for(model_dir, 64)},
            "transfer": {"backend": "zmq", "on_failure": on_failure},
            "router": {"migration_limit": migration_limit, "request_timeout_s": 30.0}}
        for section, values in (extra or {}).items():
            base[section] = {**base.get(section, {}), **values}
        self.cfg = load_config(None, base)
        self.links = InProcessLinks()
        model = ModelInfo(model_dir, VOCAB, 1024, 64, BLOCK_SIZE, "zmq")
        self.core = RouterCore(self.cfg.router, Admission(model, None), self.links, conditional=conditional)
        self.workers = {}
        try:
            for role, n in (("prefill", num_prefill), ("decode", num_decode)):
                for i in range(n):
                    self.add(role, f"{role}-{i}")
        except BaseException:   # a worker's threads would keep the test process alive
            for w in self.workers.values():
                w.close()
            raise
        self.dead: set[str] = set()

    def add(self, role: str, name: str) -> None:
        w = build_worker(role, name, self.cfg, self.cfg.model.path)
        self.workers[name] = w
        caching = getattr(self.cfg, role).enable_prefix_caching
        self.core.add_instance(InstanceInfo(name, role, "tp1-pp1", f"inproc://{name}", w.transfer_endpoint, caching))

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


async def collect(core: RouterCore, ids: list[int], max_tokens: int, events: list | None = None,
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


async def drive(cluster: Cluster, tasks: list[asyncio.Task], hook=None, max_s: float = 60.0) -> None:
    """Step the workers until every request task is done; `hook()` runs between rounds."""
    deadline = time.monotonic() + max_s
    while not all(t.done() for t in tasks):
        assert time.monotonic() < deadline, "requests did not finish in time"
        cluster.step_all()
        if hook is not None:
            hook()
        await asyncio.sleep(0)


def run(cluster: Cluster, prompts: list[list[int]], max_tokens: int, hook_factory=None, **kw):
    async def main():
        events: list = []
        tasks = [asyncio.ensure_future(collect(cluster.core, p, max_tokens, events, **kw)) for p in prompts]
        await drive(cluster, tasks, hook_factory(cluster, events) if hook_factory else None)
        return [t.result() for t in tasks]
    return asyncio.run(main())


def expected(oracle, prompts, max_tokens, **kw):
    outs = oracle.generate([list(p) for p in prompts],
                           SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw))
    return [o.token_ids for o in outs]
