"""A prefill worker and a decode worker in one process, stepped by hand like the router drives them.

Both are built by `cluster.worker_factory.build_worker` on a tiny random Llama
(float32, block size 4), with the KV moved over loopback zmq, over shm staging
(checksummed), or zero copy out of the prefill worker's shared-memory cache.
The router's part is played here (`Pair`): a PrefillDone's offer is forwarded
as a DecodeWork (as `router/core.py` `_send_decode` does), an early offer
(stream_layers) as a prefetch with the prompt, aborts go where the router
would send them. The oracle is `engine.LLM.generate` on the same model.
Every loop is bounded; every test ends with no block held on either side and
both workers closed. Test modules take the fixtures (`tiny_dir`, `oracle`,
`make_pair`) by importing them from here.
"""
from __future__ import annotations

import random
import time

import pytest

from cluster.config import load_config
from cluster.worker_factory import build_worker
from engine import LLM, SamplingParams
from engine.kv_cache import KVCache
from engine.model_config import load_model_config
from engine.model_runner import parse_dtype
from protos import pdcluster_pb2 as pb
from protos import worker_pb2 as wpb
from tests.helpers import save_tiny_model

BLOCK_SIZE = 4
VOCAB = 512
BACKENDS = ["zmq", "shm-zero-copy"]


# -- the model, the oracle ------------------------------------------------------------------
def gb_for(model_dir: str, num_blocks: int, block_size: int = BLOCK_SIZE) -> float:
    """The kv_cache_memory_gb that sizes a cache of exactly `num_blocks` blocks."""
    mc = load_model_config(model_dir)
    per_block = KVCache.bytes_per_block(mc.num_layers, block_size, mc.num_kv_heads, mc.head_dim,
                                        parse_dtype("float32"))
    return (num_blocks + 0.5) * per_block / 2**30


def expected_tokens(oracle: LLM, prompts, params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    """The engine's tokens for these prompts, generated together in one call."""
    outs = oracle.generate([list(p) for p in prompts], params)
    assert oracle.block_manager.num_free_blocks == oracle.block_manager.num_blocks
    return [o.token_ids for o in outs]


def prompt_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def sp(max_tokens=None, temperature=0.0, ignore_eos=True, **kw) -> pb.SamplingParams:
    msg = pb.SamplingParams(temperature=temperature, ignore_eos=ignore_eos, **kw)
    if max_tokens is not None:
        msg.max_tokens = max_tokens
    return msg


def params_of(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams.from_message(msg)


# -- the pair and the router's part ----------------------------------------------------------
class Pair:
    """One prefill and one decode worker built from one ClusterConfig, and a tiny router."""

    def __init__(self, model_dir: str, backend: str = "zmq", prefill_blocks: int = 64,
                 decode_blocks: int = 64, lease_ttl_s: float = 30.0, decode_max_seqs: int = 64,
                 forward: bool = True, decode_block_size: int = BLOCK_SIZE, prefill_max_tokens: int = 4096,
                 prefill_max_seqs: int = 64, stream_layers: bool = False, on_failure: str = "recompute",
                 prefix_caching: bool = False) -> None:
        transfer = {"backend": "zmq" if backend == "zmq" else "shm", "lease_ttl_s": lease_ttl_s,
                    "checksum": backend == "shm-copy", "compress": None, "stream_layers": stream_layers,
                    "on_failure": on_failure}
        cfg = load_config(None, {
            "model": {"path": model_dir, "dtype": "float32"},
            "prefill": {"block_size": BLOCK_SIZE, "kv_cache_memory_gb": gb_for(model_dir, prefill_blocks),
                        "max_num_batched_tokens": prefill_max_tokens, "max_num_seqs": prefill_max_seqs,
                        "enable_prefix_caching": prefix_caching},
            "decode": {"block_size": decode_block_size, "max_num_seqs": decode_max_seqs,
                       "kv_cache_memory_gb": gb_for(model_dir, decode_blocks, decode_block_size),
                       "enable_prefix_caching": prefix_caching},
            "transfer": transfer})
        assert cfg.transfer.zero_copy == (backend == "shm-zero-copy")
        self.prefill = build_worker("prefill", "p0", cfg, model_dir)
        try:
            self.decode = build_worker("decode", "d0", cfg, model_dir)
        except BaseException:
            self.prefill.close()
            raise
        assert self.prefill.blocks.num_blocks == prefill_blocks
        assert self.decode.blocks.num_blocks == decode_blocks
        self.forward_auto = forward
        self.closed = False
        self.prompts: dict[str, list[int]] = {}
        self.sampling: dict[str, pb.SamplingParams] = {}
        self.done: dict[str, wpb.PrefillDone] = {}
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.transfer_s: dict[str, float] = {}
        self.prefill_out: list[wpb.FromWorker] = []
        self.decode_out: list[wpb.FromWorker] = []
        if stream_layers:   # the early offer goes on to the decode worker at once, with the prompt
            self.prefill.on_offer = self._prefetch

    def _prefetch(self, req_id: str, offer: bytes) -> None:
        """The router's `_bind_decode_early`: the decode worker starts pulling while prefill runs."""
        if self.forward_auto:
            early = wpb.EarlyOffer(req_id=req_id, offer=offer, prompt_token_ids=self.prompts[req_id])
            self.decode.handle(wpb.ToWorker(prefetch=early), time.monotonic())

    # router -> workers
    def submit(self, req_id: str, prompt: list[int], sampling: pb.SamplingParams) -> None:
        self.prompts[req_id], self.sampling[req_id] = list(prompt), sampling
        self.prefill.handle(wpb.ToWorker(prefill=wpb.PrefillWork(
            req_id=req_id, prompt_token_ids=prompt, sampling=sampling)), time.monotonic())

    def forward(self, req_id: str, source: str | None = None, **changes) -> None:
        """The router's `_send_decode`: the prompt, the first token and the offer, opaque.

        `source`: take all of those from another request (to build bad copies of it)."""
        src = source or req_id
        done = self.done[src]
        fields = dict(req_id=req_id, prompt_token_ids=self.prompts[src], sampling=self.sampling[src],
                      first_token_id=done.first_token_id, offer=done.offer)
        fields.update(changes)
        self.decode.handle(wpb.ToWorker(decode=wpb.DecodeWork(**fields)), time.monotonic())

    def abort(self, req_id: str, prefill: bool = True, decode: bool = True) -> None:
        msg = wpb.ToWorker(abort=wpb.Abort(req_id=req_id))
        if prefill:
            self.prefill.handle(msg, time.monotonic())
        if decode:
            self.decode.handle(msg, time.monotonic())

    # workers -> router
    def step_prefill(self) -> wpb.FromWorker | None:
        out = self.prefill.step(time.monotonic())
        if out is not None:
            self.prefill_out.append(out)
            assert out.instance == "p0"
            for done in out.prefilled:
                assert done.req_id not in self.done, f"{done.req_id} prefilled twice"
                self.done[done.req_id] = done
                self.tokens[done.req_id] = [done.first_token_id]
                if done.finish_reason:
                    assert not done.offer
                    self.finish[done.req_id] = done.finish_reason
                else:
                    assert done.offer
                    if self.forward_auto:
                        self.forward(done.req_id)
            for f in out.failed:
                self.failed[f.req_id] = f.error
        return out

    def step_decode(self) -> wpb.FromWorker | None:
        out = self.decode.step(time.monotonic())
        if out is not None:
            self.decode_out.append(out)
            assert out.instance == "d0"
            for t in out.tokens:
                assert t.req_id not in self.finish, f"tokens for {t.req_id} after it finished"
                self.tokens.setdefault(t.req_id, []).extend(t.token_ids)
                if t.transfer_s:
                    self.transfer_s.setdefault(t.req_id, t.transfer_s)
                if t.finish_reason:
                    self.finish[t.req_id] = t.finish_reason
            for f in out.failed:
                self.failed[f.req_id] = f.error
        return out

    def step(self) -> bool:
        busy = self.step_prefill() is not None
        busy = (self.step_decode() is not None) or busy
        return busy

    def run_until(self, cond, what: str, max_iters: int = 5000, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for _ in range(max_iters):
            if cond():
                return
            if time.monotonic() > deadline:
                break
            if not self.step():
                time.sleep(0.0005)
        assert cond(), f"timed out waiting for {what}: finish={self.finish} failed={self.failed}"

    def run_to_end(self, req_ids) -> None:
        self.run_until(lambda: all(r in self.finish or r in self.failed for r in req_ids),
                       f"{list(req_ids)} to end")

    def drain(self, timeout_s: float = 30.0) -> None:
        """Step both until neither holds work (the last ACKs reach the prefill side)."""
        self.run_until(lambda: self.prefill.is_idle() and self.decode.is_idle(), "both idle",
                       timeout_s=timeout_s)

    def assert_all_free(self) -> None:
        self.drain()
        p, d = self.prefill, self.decode
        assert p.blocks.num_free_blocks == p.blocks.num_blocks, "prefill leaked blocks"
        assert d.blocks.num_free_blocks == d.blocks.num_blocks, "decode leaked blocks"
        assert p.sender.leases.live() == 0 and p.load().num_leases == 0
        assert p.load().queued_prompt_tokens == 0 and p.load().num_waiting == 0
        assert d.load().num_waiting == 0 and d.load().num_running == 0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.decode.close()
            finally:
                self.prefill.close()


def req_tokens_in(outs: list[wpb.FromWorker], req_id: str) -> list:
    return [t for o in outs for t in list(o.tokens) + list(o.prefilled) if t.req_id == req_id]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-pd")
    save_tiny_model(str(path), arch="llama", seed=3, vocab_size=VOCAB)
    return str(path)


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    return LLM(model=tiny_dir, dtype="float32", block_size=BLOCK_SIZE,
               kv_cache_memory_gb=gb_for(tiny_dir, 256), num_threads=1)


@pytest.fixture
def make_pair(tiny_dir):
    pairs: list[Pair] = []

    def make(**kw) -> Pair:
        pairs.append(Pair(tiny_dir, **kw))
        return pairs[-1]

    yield make
    for p in pairs:
        p.close()
