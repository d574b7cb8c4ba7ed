"""A prefill worker and a decode worker in one process, stepped by hand like the router drives them.

Both are built by `cluster.worker_factory.build_worker` on a tiny random Llama
(float32, block size 4), with the KV moved over loopback zmq, over shm staging
(checksummed), or zero copy out of the prefill worker's shared-memory cache.
The router's part is played here: a PrefillDone's offer is forwarded as a
DecodeWork (as `router/server.py` `_send_decode` does), aborts go where the
router would send them. The oracle is `engine.LLM.generate` on the same model.
Every loop is bounded; every test ends with no block held on either side and
both workers closed.
"""
from __future__ import annotations

import dataclasses
import pickle
import random
import time

import pytest

from cluster.config import load_config
from cluster.worker_factory import build_worker
from engine import LLM, SamplingParams
from engine.kv_cache import KVCache
from engine.model_config import load_model_config
from engine.model_runner import parse_dtype
from kv_transfer.faults import FaultInjector, FaultSpec
from protos import pdcluster_pb2 as pb
from protos import worker_pb2 as wpb
from tests.helpers import save_tiny_model

pytestmark = pytest.mark.slow     # loads a (tiny) model into three engines per test

BLOCK_SIZE = 4
VOCAB = 512
BACKENDS = ["zmq", "shm-zero-copy"]


# -- the model, the oracle ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-pd")
    save_tiny_model(str(path), arch="llama", seed=3, vocab_size=VOCAB)
    return str(path)


def _gb_for(model_dir: str, num_blocks: int, block_size: int = BLOCK_SIZE) -> float:
    """The kv_cache_memory_gb that sizes a cache of exactly `num_blocks` blocks."""
    mc = load_model_config(model_dir)
    per_block = KVCache.bytes_per_block(mc.num_layers, block_size, mc.num_kv_heads, mc.head_dim,
                                        parse_dtype("float32"))
    return (num_blocks + 0.5) * per_block / 2**30


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    return LLM(model=tiny_dir, dtype="float32", block_size=BLOCK_SIZE,
               kv_cache_memory_gb=_gb_for(tiny_dir, 256), num_threads=1)


def _expected(oracle: LLM, prompts, params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    """The engine's tokens for these prompts, generated together in one call."""
    outs = oracle.generate([list(p) for p in prompts], params)
    assert oracle.block_manager.num_free_blocks == oracle.block_manager.num_blocks
    return [o.token_ids for o in outs]


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _sp(max_tokens=None, temperature=0.0, ignore_eos=True, **kw) -> pb.SamplingParams:
    msg = pb.SamplingParams(temperature=temperature, ignore_eos=ignore_eos, **kw)
    if max_tokens is not None:
        msg.max_tokens = max_tokens
    return msg


def _params(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams.from_message(msg)


# -- the pair and the router's part ----------------------------------------------------------
class Pair:
    """One prefill and one decode worker built from one ClusterConfig, and a tiny router."""

    def __init__(self, model_dir: str, backend: str = "zmq", prefill_blocks: int = 64,
                 decode_blocks: int = 64, lease_ttl_s: float = 30.0, decode_max_seqs: int = 64,
                 forward: bool = True, decode_block_size: int = BLOCK_SIZE, prefill_max_tokens: int = 4096,
                 prefill_max_seqs: int = 64, stream_layers: bool = False, on_failure: str = "recompute") -> None:
        transfer = {"backend": "zmq" if backend == "zmq" else "shm", "lease_ttl_s": lease_ttl_s,
                    "checksum": backend == "shm-copy", "compress": None, "stream_layers": stream_layers,
                    "on_failure": on_failure}
        cfg = load_config(None, {
            "model": {"path": model_dir, "dtype": "float32"},
            "prefill": {"block_size": BLOCK_SIZE, "kv_cache_memory_gb": _gb_for(model_dir, prefill_blocks),
                        "max_num_batched_tokens": prefill_max_tokens, "max_num_seqs": prefill_max_seqs},
            "decode": {"block_size": decode_block_size, "max_num_seqs": decode_max_seqs,
                       "kv_cache_memory_gb": _gb_for(model_dir, decode_blocks, decode_block_size)},
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


@pytest.fixture
def make_pair(tiny_dir):
    pairs: list[Pair] = []

    def make(**kw) -> Pair:
        pairs.append(Pair(tiny_dir, **kw))
        return pairs[-1]

    yield make
    for p in pairs:
        p.close()


def _req_tokens_in(outs: list[wpb.FromWorker], req_id: str) -> list:
    return [t for o in outs for t in list(o.tokens) + list(o.prefilled) if t.req_id == req_id]


# -- the tokens are the engine's --------------------------------------------------------------
@pytest.mark.parametrize("backend", ["zmq", "shm-zero-copy", "shm-copy"])
def test_batched_greedy_tokens_match_the_engine(make_pair, oracle, backend):
    # 1 partial block, 1 exact block, >2 blocks with a partial last one, exact 4 blocks, 10 blocks
    lengths = [3, 4, 9, 13, 16, 37]
    max_tokens = [6, 9, 5, 12, 7, 10]
    prompts = [_prompt(n, seed=i) for i, n in enumerate(lengths)]
    pair = make_pair(backend=backend)
    for i, (prompt, mt) in enumerate(zip(prompts, max_tokens)):
        pair.submit(f"r{i}", prompt, _sp(mt))
    assert pair.prefill.load().queued_prompt_tokens == sum(lengths)

    out = pair.step_prefill()       # every prompt in one packed prefill step
    assert out is not None and len(out.prefilled) == len(prompts)
    assert pair.prefill.num_steps == 1
    held = sum(-(-n // BLOCK_SIZE) for n in lengths)
    assert out.load.num_leases == len(prompts)
    assert out.load.num_free_blocks == pair.prefill.blocks.num_blocks - held
    assert out.load.queued_prompt_tokens == 0

    pair.run_to_end([f"r{i}" for i in range(len(prompts))])
    assert pair.failed == {}
    want = _expected(oracle, prompts, [_params(_sp(mt)) for mt in max_tokens])
    for i, prompt in enumerate(prompts):
        assert len(want[i]) == max_tokens[i]
        assert pair.tokens[f"r{i}"] == want[i], f"r{i} (prompt of {len(prompt)} tokens)"
        assert pair.finish[f"r{i}"] == "length"
        assert pair.transfer_s.get(f"r{i}", 0.0) > 0.0
    # the prefill side's leases ended by ACK, not by expiry
    pair.assert_all_free()
    stats = pair.prefill.sender.leases.stats()
    assert stats.num_done == len(prompts) and stats.num_expired == stats.num_failed == 0


def test_seeded_sampling_matches_the_engine_across_workers(make_pair, oracle):
    """The seed is mixed with the token's index: the split between workers changes nothing."""
    prompts = [_prompt(n, seed=10 + n) for n in (5, 11, 18)]
    msg = _sp(9, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    want = _expected(oracle, prompts, _params(msg))
    pair = make_pair(backend="shm-zero-copy")
    for i, prompt in enumerate(prompts):
        pair.submit(f"s{i}", prompt, msg)
    pair.run_to_end(["s0", "s1", "s2"])
    assert [pair.tokens[f"s{i}"] for i in range(3)] == want
    pair.assert_all_free()


# -- finishing at prefill, EOS ------------------------------------------------------------------
def test_max_tokens_1_and_eos_finish_at_prefill_with_no_lease(make_pair, oracle):
    prompts = [_prompt(n, seed=20 + n) for n in (6, 9, 14)]
    firsts = [t[0] for t in _expected(oracle, prompts, _params(_sp(1)))]
    pair = make_pair()
    # the first token of prompt 1 is this model's EOS from now on (on both workers)
    eos = firsts[1]
    pair.prefill.eos_token_ids = frozenset({eos})
    pair.decode.scheduler.eos_token_ids = frozenset({eos})
    pair.submit("one", prompts[0], _sp(1))
    pair.submit("eos", prompts[1], _sp(8, ignore_eos=False))
    pair.submit("keeps", prompts[2], _sp(8, ignore_eos=True))
    pair.forward_auto = False
    out = pair.step_prefill()
    assert {d.req_id: d.finish_reason for d in out.prefilled} == {"one": "length", "eos": "eos", "keeps": ""}
    assert pair.done["one"].offer == b"" and pair.done["eos"].offer == b""
    assert pair.tokens["one"] == [firsts[0]] and pair.tokens["eos"] == [eos]
    # only "keeps" is under a lease, and only its prompt's blocks are held
    assert out.load.num_leases == 1
    assert pair.prefill.blocks.num_used_blocks == -(-len(prompts[2]) // BLOCK_SIZE)
    pair.forward("keeps")
    pair.forward_auto = True
    pair.run_to_end(["keeps"])
    assert pair.tokens["keeps"] == _expected(oracle, [prompts[2]], _params(_sp(8)))[0]
    assert not _req_tokens_in(pair.decode_out, "one") and not _req_tokens_in(pair.decode_out, "eos")
    pair.assert_all_free()


def test_eos_at_decode_ends_the_request(make_pair, oracle):
    prompt = _prompt(10, seed=31)
    full = _expected(oracle, [prompt], _params(_sp(12)))[0]
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    pair = make_pair()
    pair.prefill.eos_token_ids = frozenset({full[k]})
    pair.decode.scheduler.eos_token_ids = frozenset({full[k]})
    pair.submit("r", prompt, _sp(12, ignore_eos=False))
    pair.run_to_end(["r"])
    assert pair.tokens["r"] == full[:k + 1]
    assert pair.finish["r"] == "eos"
    pair.assert_all_free()


# -- abort in every state -------------------------------------------------------------------------
STATES = ["prefill-waiting", "prefill-leased", "decode-pending", "decode-pulling", "decode-running"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state", STATES)
def test_abort_in_every_state_frees_every_block(make_pair, oracle, backend, state):
    victim, other = _prompt(13, seed=41), _prompt(7, seed=42)
    pair = make_pair(backend=backend, forward=False)
    pair.submit("other", other, _sp(6))          # a bystander that must be served unharmed
    pair.submit("v", victim, _sp(20))
    d_total, p_total = pair.decode.blocks.num_blocks, pair.prefill.blocks.num_blocks

    if state == "prefill-waiting":
        assert pair.prefill.load().num_waiting == 2
        pair.abort("v")
        assert pair.prefill.load().queued_prompt_tokens == len(other)
        pair.step_prefill()
        assert "v" not in pair.done
        pair.forward("other")
    else:
        pair.step_prefill()
        pair.forward("other")
        assert pair.prefill.load().num_leases == 2
        if state == "prefill-leased":
            pair.abort("v")          # the router aborts everywhere; decode never heard of it
            assert pair.prefill.load().num_leases == 1
            assert pair.prefill.blocks.num_used_blocks == -(-len(other) // BLOCK_SIZE)
        elif state == "decode-pending":
            pair.forward("v")
            assert pair.decode.load().num_waiting == 2          # both pending, nothing allocated
            assert pair.decode.blocks.num_free_blocks == d_total
            pair.abort("v")
        elif state == "decode-pulling":
            pair.forward("v")
            # admitted, not polled: blocks allocated, pull started (a direct zero copy lands
            # at the step's poll, so a whole step would already have it running)
            pair.decode._admit(time.monotonic())
            assert pair.decode.blocks.num_free_blocks < d_total
            assert pair.decode.load().num_running == 0
            pair.abort("v", prefill=False)   # only decode: its ABORT must end the prefill lease
            assert pair.decode.blocks.num_used_blocks == -(-len(other) // BLOCK_SIZE)
        elif state == "decode-running":
            pair.forward("v")
            pair.run_until(lambda: len(pair.tokens["v"]) >= 3, "three tokens of v")
            pair.abort("v")
            assert pair.decode.scheduler.get("v") is None
    n_before = len(pair.tokens.get("v", []))
    pair.forward_auto = True
    pair.run_to_end(["other"])
    pair.drain()
    assert len(pair.tokens.get("v", [])) == n_before, "tokens for v after its abort"
    assert "v" not in pair.finish and "v" not in pair.failed
    assert pair.tokens["other"] == _expected(oracle, [other], _params(_sp(6)))[0]
    pair.assert_all_free()
    assert pair.prefill.blocks.num_free_blocks == p_total
    # how each lease ended: "other" by its hand-off; "v" by the abort, wherever it reached it
    # (running: v's ACK may reach prefill after the router's abort, which then ended the lease)
    stats = pair.prefill.sender.leases.stats()
    want = {"prefill-waiting": [(1, 0)], "prefill-leased": [(1, 1)], "decode-pending": [(1, 1)],
            "decode-pulling": [(1, 1)], "decode-running": [(2, 0), (1, 1)]}[state]
    assert (stats.num_done, stats.num_aborted) in want
    assert stats.num_expired == stats.num_failed == 0


def test_abort_of_unknown_or_finished_requests_is_harmless(make_pair):
    pair = make_pair()
    pair.abort("nobody")
    pair.submit("r", _prompt(5, seed=50), _sp(3))
    pair.run_to_end(["r"])
    pair.abort("r")
    pair.abort("r")
    pair.step()
    assert pair.failed == {}
    pair.assert_all_free()


# -- a failed transfer is recomputed at decode, with the same tokens ----------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cause", ["lease-expired", "aborted-at-prefill", "pull-cannot-start"])
def test_failed_transfer_recomputes_with_identical_tokens(make_pair, oracle, backend, cause):
    lengths = [5, 12, 21]
    prompts = [_prompt(n, seed=60 + n) for n in lengths]
    pair = make_pair(backend=backend, lease_ttl_s=0.05, forward=False)
    ids = [f"f{i}" for i in range(len(prompts))]
    for r, prompt in zip(ids, prompts):
        pair.submit(r, prompt, _sp(8))
    pair.step_prefill()
    assert set(pair.done) == set(ids)
    if cause == "lease-expired":
        time.sleep(0.15)                    # past the TTL before decode asks
        for r in ids:
            pair.forward(r)
    elif cause == "aborted-at-prefill":
        for r in ids:
            pair.prefill.abort(r, time.monotonic())
            pair.forward(r)
        assert pair.prefill.load().num_leases == 0
    else:   # an offer decode cannot even start pulling (another backend's)
        for r in ids:
            offer = pickle.loads(pair.done[r].offer)
            bad = dataclasses.replace(offer, backend="zmq" if offer.backend == "shm" else "shm")
            pair.forward(r, offer=pickle.dumps(bad))
    pair.forward_auto = True
    pair.run_to_end(ids)
    assert pair.failed == {}
    for r, prompt in zip(ids, prompts):
        assert pair.tokens[r] == _expected(oracle, [prompt], _params(_sp(8)))[0], r
        assert pair.finish[r] == "length"
    pair.assert_all_free()
    stats = pair.prefill.sender.leases.stats()
    assert stats.num_done == 0           # no lease ended in a successful hand-off
    if cause == "lease-expired":
        assert stats.num_expired + stats.num_failed == len(ids)
    if cause == "pull-cannot-start":
        # decode gives the offer back (ABORT), unless the 50 ms TTL ran out first
        assert stats.num_aborted + stats.num_expired == len(ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pull_that_cannot_start_aborts_the_prefill_lease_at_once(make_pair, oracle, backend):
    prompt = _prompt(10, seed=70)
    pair = make_pair(backend=backend, lease_ttl_s=30.0, forward=False)
    pair.submit("r", prompt, _sp(5))
    pair.step_prefill()
    offer = pickle.loads(pair.done["r"].offer)
    bad = dataclasses.replace(offer, backend="zmq" if offer.backend == "shm" else "shm")
    pair.forward("r", offer=pickle.dumps(bad))
    start = time.monotonic()
    pair.run_until(lambda: pair.prefill.load().num_leases == 0, "the prefill lease to end", timeout_s=5)
    assert time.monotonic() - start < 2.0, "the lease ended by its TTL, not by an ABORT"
    assert pair.prefill.sender.leases.stats().num_aborted == 1
    pair.run_to_end(["r"])
    assert pair.tokens["r"] == _expected(oracle, [prompt], _params(_sp(5)))[0]   # recomputed at decode
    pair.assert_all_free()


@pytest.mark.parametrize("policy", ["recompute", "reprefill", "fail"])
@pytest.mark.parametrize("cause", ["pull-cannot-start", "corrupted"])
def test_a_failed_pull_follows_on_failure_and_ends_the_live_lease_at_once(make_pair, oracle, policy, cause):
    """transfer.on_failure decides what becomes of the request; whichever, the live prefill
    side hears of it at once (the offer given back, or ACK ok=False after the retries) and
    frees the blocks long before its lease's TTL."""
    prompt = _prompt(11, seed=75)
    pair = make_pair(backend="shm-copy" if cause == "corrupted" else "zmq", lease_ttl_s=30.0, forward=False,
                     on_failure=policy)
    pair.submit("r", prompt, _sp(6))
    pair.step_prefill()
    if cause == "corrupted":   # every reply: the checksum catches it, each of the 3 attempts
        pair.prefill.sender._faults = FaultInjector(FaultSpec(corrupt_prob=1.0))
        pair.forward("r")
    else:
        offer = pickle.loads(pair.done["r"].offer)
        pair.forward("r", offer=pickle.dumps(dataclasses.replace(offer, backend="shm")))
    start = time.monotonic()
    pair.run_until(lambda: pair.prefill.load().num_leases == 0, "the prefill lease to end", timeout_s=10)
    assert time.monotonic() - start < 2.0, "the lease ended by its TTL"
    stats = pair.prefill.sender.leases.stats()
    assert (stats.num_aborted, stats.num_failed) == ((1, 0) if cause == "pull-cannot-start" else (0, 1))
    pair.run_to_end(["r"])
    failed = [f for m in pair.decode_out for f in m.failed]
    if policy == "recompute":
        assert not failed and pair.tokens["r"] == _expected(oracle, [prompt], _params(_sp(6)))[0]
    else:
        assert [(f.req_id, f.retry) for f in failed] == [("r", policy == "reprefill")]
        assert pair.tokens["r"] == [pair.done["r"].first_token_id]
    assert pair.decode.stats()["num_failed_pulls"] == 1
    pair.assert_all_free()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pull_is_answered_during_the_next_prefill_forward(make_pair, oracle, backend):
    """A decode worker's PULL that reaches the prefill worker while it runs another
    batch is answered between layers (no stream_layers), not after the batch."""
    first, long = _prompt(10, seed=80), _prompt(60, seed=81)
    pair = make_pair(backend=backend, forward=False)
    pair.submit("a", first, _sp(4))
    pair.step_prefill()
    pair.forward("a")
    pair.submit("b", long, _sp(4))
    runner = pair.prefill.runner
    plain_execute = runner.execute
    layers_after_pull = []

    def execute(plan, on_layer=None):
        assert on_layer is not None, "the prefill worker gave its forward no per-layer hook"

        def hook(i):
            if i == 0:
                pair.step_decode()            # decode admits "a" and sends its PULL now
            else:                             # a real layer takes this long on a real model
                layers_after_pull.append(i)
                time.sleep(0.05)
            on_layer(i)
        return plain_execute(plan, on_layer=hook)

    runner.execute = execute
    try:
        pair.step_prefill()                   # b's forward: a's PULL arrives inside it
    finally:
        runner.execute = plain_execute
    assert layers_after_pull and "b" in pair.done
    # a's KV lands without another prefill step
    deadline = time.monotonic() + 5.0
    while pair.decode._pulls and time.monotonic() < deadline:
        pair.step_decode()
        time.sleep(0.001)
    assert not pair.decode._pulls, "the pull waited for the prefill worker's next step"
    pair.forward("b")
    pair.run_to_end(["a", "b"])
    expected = _expected(oracle, [first, long], _params(_sp(4)))
    assert [pair.tokens["a"], pair.tokens["b"]] == expected
    pair.assert_all_free()


# -- bad work --------------------------------------------------------------------------------------
def test_bad_work_fails_that_request_and_the_workers_keep_serving(make_pair, oracle):
    good, other = _prompt(11, seed=70), _prompt(6, seed=71)
    pair = make_pair(forward=False)
    pair.submit("good", good, _sp(10))
    pair.submit("other", other, _sp(4))
    # bad prefill work: an empty prompt, a token outside the vocabulary, max_tokens 0, a DecodeWork
    pair.submit("p-empty", [], _sp(4))
    pair.submit("p-vocab", [5, VOCAB + 3, 7], _sp(4))
    pair.submit("p-zero", [5, 6, 7], _sp(0))
    pair.submit("p-long", [5] * 1000, _sp(100))
    pair.prefill.handle(wpb.ToWorker(decode=wpb.DecodeWork(req_id="p-kind")), time.monotonic())
    pair.step_prefill()
    assert set(pair.done) == {"good", "other"}
    assert set(pair.failed) == {"p-empty", "p-vocab", "p-zero", "p-long", "p-kind"}
    assert "prompt is empty" in pair.failed["p-empty"]
    assert str(VOCAB + 3) in pair.failed["p-vocab"]
    assert "max_tokens" in pair.failed["p-zero"]
    assert "cannot take" in pair.failed["p-kind"]

    pair.forward("good")
    pair.step_decode()                  # good is under way while the bad ones arrive
    offer_other = pair.done["other"].offer
    bad = {
        "d-garbage": dict(offer=b"garbage"),
        "d-empty-offer": dict(offer=b""),
        "d-not-an-offer": dict(offer=pickle.dumps({"transfer_id": "x"})),
        "d-wrong-length": dict(offer=offer_other, prompt_token_ids=other + [9]),
        "d-empty-prompt": dict(offer=offer_other, prompt_token_ids=[]),
        "d-vocab": dict(offer=offer_other, prompt_token_ids=[VOCAB] * len(other)),
        "d-zero": dict(offer=offer_other, sampling=_sp(0)),
    }
    for req_id, changes in bad.items():
        pair.forward(req_id, source="other", **changes)
    pair.decode.handle(wpb.ToWorker(prefill=wpb.PrefillWork(req_id="d-kind")), time.monotonic())
    pair.decode.handle(wpb.ToWorker(), time.monotonic())          # no kind at all
    pair.step_decode()
    assert set(bad) | {"d-kind"} <= set(pair.failed)
    assert "does not match" in pair.failed["d-wrong-length"]
    pair.forward("other")               # the real one, after its bad copies
    pair.forward_auto = True
    pair.run_to_end(["good", "other"])
    assert pair.tokens["good"] == _expected(oracle, [good], _params(_sp(10)))[0]
    assert pair.tokens["other"] == _expected(oracle, [other], _params(_sp(4)))[0]
    assert "good" not in pair.failed and "other" not in pair.failed
    pair.assert_all_free()


def test_offer_bytes_raising_valueerror_give_a_failed_message(make_pair):
    pair = make_pair()
    bad_work = wpb.DecodeWork(req_id="bad", prompt_token_ids=[5, 6, 7], sampling=_sp(4),
                              first_token_id=9, offer=b"\x80\x09")   # "unsupported pickle protocol: 9"
    try:
        pair.decode.handle(wpb.ToWorker(decode=bad_work), time.monotonic())
        pair.step_decode()
        assert "bad" in pair.failed
    finally:
        pair.assert_all_free()


def test_first_token_outside_the_vocabulary_fails_only_that_request(make_pair, oracle):
    good, other = _prompt(9, seed=80), _prompt(8, seed=81)
    pair = make_pair(forward=False)
    pair.submit("good", good, _sp(8))
    pair.submit("bad", other, _sp(8))
    pair.step_prefill()
    pair.forward("good")
    pair.forward("bad", first_token_id=VOCAB + 7)
    pair.forward_auto = True
    try:
        pair.run_to_end(["good", "bad"])
        assert "good" not in pair.failed, pair.failed.get("good")
        assert pair.tokens["good"] == _expected(oracle, [good], _params(_sp(8)))[0]
        assert "bad" in pair.failed
    finally:
        pair.abort("bad")
        pair.assert_all_free()


# -- waiting for room ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("short_of", ["blocks", "slots"])
def test_decode_request_waits_pending_until_room_frees(make_pair, oracle, backend, short_of):
    big, small = _prompt(25, seed=90), _prompt(10, seed=91)
    if short_of == "blocks":        # 8 blocks of 4: big holds 7 (prompt 25), small needs 3
        pair = make_pair(backend=backend, decode_blocks=8)
    else:                           # one batch slot
        pair = make_pair(backend=backend, decode_max_seqs=1)
    pair.submit("big", big, _sp(6))       # 25 + 6 = 31 tokens: fits 8 blocks
    pair.submit("small", small, _sp(5))
    pair.step_prefill()                   # both prefilled together, both forwarded, big first
    pair.decode._admit(time.monotonic())  # big admitted (pulling, not polled yet), small must wait
    assert pair.decode.load().num_waiting == 2
    pair.run_until(lambda: len(pair.tokens["big"]) >= 3, "big running")
    assert pair.tokens["small"] == [pair.done["small"].first_token_id]       # nothing decoded yet
    assert pair.decode.load().num_running == 1 and pair.decode.load().num_waiting == 1
    # small's KV is still held at prefill, not yet asked for
    small_lease = pair.prefill.sender.leases.get(pickle.loads(pair.done["small"].offer).transfer_id)
    assert small_lease is not None and small_lease.state.value == "offered"
    pair.run_to_end(["big", "small"])
    assert pair.failed == {}
    assert pair.tokens["big"] == _expected(oracle, [big], _params(_sp(6)))[0]
    assert pair.tokens["small"] == _expected(oracle, [small], _params(_sp(5)))[0]
    # small was pulled (not recomputed) once big had finished; the sender hears a zero-copy
    # pull's end a step or two after the receiver has the bytes
    pair.run_until(lambda: pair.prefill.sender.leases.stats().num_done == 2, "both leases done")
    assert pair.prefill.sender.leases.stats().num_failed == 0
    pair.assert_all_free()


def test_prefill_waits_for_blocks_held_under_a_lease(make_pair, oracle):
    big, small = _prompt(25, seed=92), _prompt(10, seed=93)
    pair = make_pair(backend="shm-zero-copy", prefill_blocks=8, forward=False)
    pair.submit("big", big, _sp(6))
    pair.submit("small", small, _sp(5))
    pair.step_prefill()
    assert set(pair.done) == {"big"}            # small's 3 blocks are not free: it waits
    load = pair.prefill.load()
    assert load.num_waiting == 1 and load.queued_prompt_tokens == len(small) and load.num_leases == 1
    for _ in range(5):
        pair.step_prefill()
    assert "small" not in pair.done and not pair.prefill.is_idle()
    pair.forward("big")                         # once decode pulled big's KV, small runs
    pair.forward_auto = True
    pair.run_to_end(["big", "small"])
    assert pair.tokens["big"] == _expected(oracle, [big], _params(_sp(6)))[0]
    assert pair.tokens["small"] == _expected(oracle, [small], _params(_sp(5)))[0]
    assert pair.done["small"].queue_s > 0
    pair.assert_all_free()


def test_admitted_requests_are_not_preempted_at_their_first_decode_step(make_pair, oracle):
    # block-aligned prompts: the first token needs a third block each; 5 blocks admit both (3 + 3 > 5 though)
    a, b = _prompt(8, seed=95), _prompt(8, seed=96)
    pair = make_pair(decode_blocks=5)
    pair.submit("a", a, _sp(4))
    pair.submit("b", b, _sp(4))
    preempted = []
    try:
        def check():
            preempted.extend(s.req_id for s in pair.decode.scheduler.waiting)
            return all(r in pair.finish or r in pair.failed for r in ("a", "b"))
        pair.run_until(check, "a and b to end")
        assert pair.tokens["a"] == _expected(oracle, [a], _params(_sp(4)))[0]
        assert pair.tokens["b"] == _expected(oracle, [b], _params(_sp(4)))[0]
        assert not preempted, f"{sorted(set(preempted))} were pulled, then preempted and recomputed"
    finally:
        pair.assert_all_free()


def test_an_offer_for_another_request_is_refused(make_pair, oracle):
    other = _prompt(9, seed=97)
    pair = make_pair(forward=False)
    pair.submit("other", other, _sp(5))
    pair.step_prefill()
    pair.forward("thief", source="other", prompt_token_ids=_prompt(9, seed=98))
    try:
        pair.step_decode()
        assert "thief" in pair.failed
    finally:
        pair.abort("thief")
        pair.forward("other")
        pair.forward_auto = True
        pair.run_to_end(["other"])
        assert pair.tokens["other"] == _expected(oracle, [other], _params(_sp(5)))[0]
        pair.assert_all_free()


def test_a_duplicate_decode_work_does_not_break_the_step(make_pair, oracle):
    a = _prompt(8, seed=99)
    pair = make_pair(forward=False)
    pair.submit("a", a, _sp(200))      # long enough to be running still when the duplicate lands
    pair.step_prefill()
    pair.forward("a")
    pair.forward_auto = True
    pair.run_until(lambda: len(pair.tokens["a"]) >= 2, "a running")
    pair.forward("a")               # the same work again: its lease has ended, the pull fails
    try:
        pair.run_to_end(["a"])
        assert pair.tokens["a"] == _expected(oracle, [a], _params(_sp(200)))[0]
    finally:
        pair.abort("a")
        pair.assert_all_free()


@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_the_decode_worker_mid_pull_frees_the_prefill_lease(make_pair, backend):
    """The receiver's close sends ABORT for its pulls and lingers until it is out: the
    lease ends by that ABORT at once, long before its TTL."""
    pair = make_pair(backend=backend, lease_ttl_s=30.0)
    pair.submit("r", _prompt(14, seed=100), _sp(8))
    pair.step_prefill()
    pair.decode._admit(time.monotonic())     # pulling (a step would land a direct zero copy)
    assert pair.decode.load().num_waiting == 1 and pair.prefill.load().num_leases == 1
    pair.closed = True
    pair.decode.close()
    try:
        deadline = time.monotonic() + 2
        while pair.prefill.load().num_leases and time.monotonic() < deadline:
            pair.prefill.step(time.monotonic())
            time.sleep(0.002)
        assert pair.prefill.load().num_leases == 0
        assert pair.prefill.blocks.num_free_blocks == pair.prefill.blocks.num_blocks
        stats = pair.prefill.sender.leases.stats()
        assert stats.num_aborted == 1 and stats.num_done == 0
        assert pair.prefill.is_idle()
    finally:
        pair.prefill.close()


# -- scheduling details ------------------------------------------------------------------------------
def test_prefill_batches_under_the_token_budget_and_sequence_limit_in_arrival_order(make_pair, oracle):
    # budget 16 tokens, 2 prompts a step: [9, 6] | [30 alone: over the budget, it must not starve] | [5, 4]
    lengths = [9, 6, 30, 5, 4]
    prompts = [_prompt(n, seed=110 + i) for i, n in enumerate(lengths)]
    pair = make_pair(prefill_max_tokens=16, prefill_max_seqs=2)
    for i, prompt in enumerate(prompts):
        pair.submit(f"b{i}", prompt, _sp(4))
    batches = []
    for _ in range(3):
        out = pair.step_prefill()
        batches.append([d.req_id for d in out.prefilled])
    assert batches == [["b0", "b1"], ["b2"], ["b3", "b4"]]
    assert pair.prefill.num_steps == 3
    pair.run_to_end([f"b{i}" for i in range(5)])
    want = _expected(oracle, prompts, _params(_sp(4)))
    assert [pair.tokens[f"b{i}"] for i in range(5)] == want
    pair.assert_all_free()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_preemption_under_a_small_cache_keeps_the_tokens(make_pair, oracle, backend):
    """Pulled requests outgrow the decode cache: the newest is preempted and recomputed there."""
    prompts = [_prompt(6, seed=120), _prompt(7, seed=121)]
    pair = make_pair(backend=backend, decode_blocks=8)     # each needs 5 blocks at the end: 10 > 8
    for i, prompt in enumerate(prompts):
        pair.submit(f"g{i}", prompt, _sp(13))
    preempted = set()

    def check():
        preempted.update(s.req_id for s in pair.decode.scheduler.waiting)
        return all(f"g{i}" in pair.finish for i in range(2)) or bool(pair.failed)
    pair.run_until(check, "both to end")
    assert pair.failed == {}
    assert preempted                                    # the cache really was too small
    want = _expected(oracle, prompts, _params(_sp(13)))
    assert [pair.tokens["g0"], pair.tokens["g1"]] == want
    pair.assert_all_free()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_and_decode_with_different_block_sizes(make_pair, oracle, backend):
    prompts = [_prompt(n, seed=130 + n) for n in (5, 13, 21)]
    pair = make_pair(backend=backend, decode_block_size=8, decode_blocks=32)
    for i, prompt in enumerate(prompts):
        pair.submit(f"x{i}", prompt, _sp(8))
    pair.run_to_end(["x0", "x1", "x2"])
    assert pair.failed == {}
    assert [pair.tokens[f"x{i}"] for i in range(3)] == _expected(oracle, prompts, _params(_sp(8)))
    pair.assert_all_free()
    assert pair.prefill.sender.leases.stats().num_done == 3       # pulled, not recomputed
