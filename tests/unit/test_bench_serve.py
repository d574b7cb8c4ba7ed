"""The serving benchmark: its arithmetic by hand, and its open-loop sender against a real gRPC server.

The server here is a small real `grpc.aio` server speaking the project's API
(protos/pdcluster.proto) on 127.0.0.1, with scripted latencies: so the
load generator's timing (arrivals kept, slow requests not blocking later
ones, the time limit) is checked end to end through the real SDK, in about
ten seconds, without loading a model.
"""
from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest

from cluster.bench.serve import PromptMaker, SweepSpec, run_point, sweep, trace_requests, wait_idle
from cluster.bench.serve_metrics import (CANCELLED, FAILED, OK, SLO, UNSENT, BenchError, RequestResult,
                                         attainment, goodput, goodput_interpolated, next_bisection_rate,
                                         percentile, summarize, tpot)
from cluster.client import AsyncClient
from protos import pdcluster_pb2 as pb
from protos import pdcluster_pb2_grpc as pb_grpc
from router.workload import RequestSpec

SPECIAL = (0, 1, 2, 3)
VOCAB = 50


# ---- the arithmetic ---------------------------------------------------------------------------

def _ok(ttft: float, e2e: float, n_out: int, i: int = 0) -> RequestResult:
    return RequestResult(i, 0.0, 10, n_out, status=OK, n_out=n_out, ttft_s=ttft, e2e_s=e2e)


def test_tpot_is_the_time_after_the_first_token_over_the_remaining_tokens():
    assert tpot(2.5, 0.5, 11) == pytest.approx(0.2)
    assert tpot(0.5, 0.5, 1) == 0.0               # one token: no gap to miss
    assert tpot(None, 0.5, 5) is None and tpot(1.0, 0.5, 0) is None
    r = _ok(0.5, 2.5, 11)
    assert r.tpot_s == pytest.approx(0.2) and r.to_dict()["tpot_s"] == pytest.approx(0.2)
    r.status = FAILED
    assert r.tpot_s is None


def test_percentile_matches_linear_interpolation():
    np = pytest.importorskip("numpy")
    rng = random.Random(3)
    for n in (1, 2, 5, 17, 100):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    with pytest.raises(BenchError, match="percentile"):
        percentile([1.0], 101)


def test_attainment_needs_both_slos_and_counts_failures_as_misses():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    results = [
        _ok(0.5, 1.4, 10),                       # TTFT 0.5, TPOT 0.1: both met (at the limit)
        _ok(1.5, 2.0, 10),                       # TTFT missed
        _ok(0.5, 5.0, 10),                       # TPOT 0.5 missed
        RequestResult(3, 0.0, 10, 10, status=FAILED, error="boom"),
        RequestResult(4, 0.0, 10, 10, status=CANCELLED),
        RequestResult(5, 0.0, 10, 10, status=UNSENT),
        _ok(0.2, 0.2, 1),                        # one token
        _ok(0.9, 1.8, 10),                       # both met
    ]
    assert attainment(results, slo) == pytest.approx(3 / 8)
    s = summarize(results, slo, rate=2.0, duration_s=10.0)
    assert s["counts"] == {OK: 5, FAILED: 1, CANCELLED: 1, UNSENT: 1}
    assert s["attainment"] == pytest.approx(3 / 8)
    assert s["ttft_attainment"] == pytest.approx(4 / 8) and s["tpot_attainment"] == pytest.approx(4 / 8)
    assert s["ttft_s"]["p50"] == pytest.approx(0.5)            # over the 5 that finished
    assert s["output_tokens_per_s"] == pytest.approx(41 / 10)
    assert attainment([], slo) == 0.0


def test_slo_and_spec_reject_bad_values_by_name():
    with pytest.raises(BenchError, match="ttft SLO"):
        SLO(0, 0.1)
    with pytest.raises(BenchError, match="tpot SLO"):
        SLO(1.0, float("nan"))
    with pytest.raises(BenchError, match="rates"):
        SweepSpec("chatbot", (1.0, -2.0), 10, SLO(1, 0.1))
    with pytest.raises(BenchError, match="num_requests"):
        SweepSpec("chatbot", (1.0,), 0, SLO(1, 0.1))


def test_goodput_is_the_last_rate_of_the_first_run_of_passes():
    pts = [(2.0, 0.95), (1.0, 1.0), (3.0, 0.85), (4.0, 0.92)]    # 4.0 passes again by luck: not counted
    assert goodput(pts, 0.9) == 2.0
    assert goodput_interpolated(pts, 0.9) == pytest.approx(2.0 + (0.95 - 0.9) / (0.95 - 0.85))
    assert goodput([(1.0, 0.5), (2.0, 0.95)], 0.9) == 0.0          # the lowest rate already misses
    assert goodput_interpolated([(1.0, 0.5)], 0.9) == 0.0
    assert goodput([(1.0, 0.95), (2.0, 0.91)], 0.9) == 2.0 == goodput_interpolated([(1.0, 0.95), (2.0, 0.91)])
    assert goodput([], 0.9) == 0.0
    with pytest.raises(BenchError, match="target"):
        goodput(pts, 1.5)


def test_bisection_halves_the_gap_between_last_pass_and_first_miss():
    assert next_bisection_rate([(1.0, 0.99), (2.0, 0.95), (4.0, 0.5)], 0.9) == 3.0
    assert next_bisection_rate([(1.0, 0.99), (2.0, 0.95)], 0.9) is None            # no miss yet
    assert next_bisection_rate([(1.0, 0.5), (2.0, 0.4)], 0.9) is None              # no pass at all
    assert next_bisection_rate([(1.0, 0.99), (1.05, 0.5)], 0.9, min_gap=0.1) is None


def test_prompts_have_the_exact_length_no_special_token_and_are_seeded():
    maker = PromptMaker(VOCAB, SPECIAL, seed=7)
    ids = maker.ids(500, index=3)
    assert len(ids) == 500 and all(4 <= i < VOCAB for i in ids)
    assert len(set(ids)) > 30                                    # spread over the vocabulary
    assert ids == PromptMaker(VOCAB, SPECIAL, seed=7).ids(500, 3)
    assert ids != maker.ids(500, 4) and ids != PromptMaker(VOCAB, SPECIAL, seed=8).ids(500, 3)
    with pytest.raises(BenchError, match="special"):
        PromptMaker(3, (0, 1, 2))


def test_each_rate_point_has_its_own_prompts_and_turns_still_extend_each_other():
    # with prefix caching on, a point must not find the previous point's requests in the cache
    maker = PromptMaker(VOCAB, SPECIAL, seed=7)
    assert maker.ids(200, 3, point=0) == maker.ids(200, 3)
    assert maker.ids(200, 3, point=1) != maker.ids(200, 3, point=0)
    assert maker.ids(200, 3, point=1) == PromptMaker(VOCAB, SPECIAL, seed=7).ids(200, 3, point=1)
    first, later = maker.ids(100, 0, conversation=2, point=1), maker.ids(250, 5, conversation=2, point=1)
    assert later[:100] == first                                   # a later turn extends the earlier one
    assert maker.ids(100, 0, conversation=2, point=0) != first
    # the warm-up's requests (indices -1, -2) share nothing with the measured ones
    assert maker.ids(200, -1)[:20] != maker.ids(200, 1)[:20] and maker.ids(200, -2)[:20] != maker.ids(200, 2)[:20]


def test_trace_is_rescaled_to_the_asked_rate(tmp_path):
    path = tmp_path / "trace.csv"
    rows = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    rows += [f"{10 * i},ChatGPT,{100 + i},{20 + i},{120 + 2 * i},Conversation log" for i in range(11)]
    path.write_text("\n".join(rows) + "\n")
    specs = trace_requests(str(path), rate=2.0, num_requests=11, max_total_tokens=4096)
    assert len(specs) == 11 and specs[-1].arrival_s == pytest.approx(5.0)   # 10 gaps at 2 req/s
    assert [s.prompt_tokens for s in specs] == [100 + i for i in range(11)]


# ---- the open-loop sender against a real gRPC server ----------------------------------------

class ScriptedServer(pb_grpc.GenerationServicer, pb_grpc.AdminServicer):
    """First token after `ttft_s` (+ `slow_ttft_s` for prompts of length SLOW), then one token per
    `gap_s`; prompts of length STUCK never answer. Records arrivals and what it was asked."""
    SLOW, STUCK = 7, 5

    def __init__(self, ttft_s: float = 0.05, gap_s: float = 0.02, slow_ttft_s: float = 1.5) -> None:
        self.ttft_s, self.gap_s, self.slow_ttft_s = ttft_s, gap_s, slow_ttft_s
        self.received: list[tuple[float, list[int], int, bool]] = []
        self.active = 0
        self.cancelled = 0

    async def Generate(self, request, context):
        loop = asyncio.get_running_loop()
        ids = list(request.token_ids.ids)
        self.received.append((loop.time(), ids, request.sampling.max_tokens, request.sampling.ignore_eos))
        self.active += 1
        try:
            if len(ids) == self.STUCK:
                await asyncio.sleep(3600)
            await asyncio.sleep(self.ttft_s + (self.slow_ttft_s if len(ids) == self.SLOW else 0.0))
            for k in range(request.sampling.max_tokens):
                if k:
                    await asyncio.sleep(self.gap_s)
                yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[10 + k], text="x"))
            timings = pb.Timings(queue_s=0.001, prefill_s=self.ttft_s, ttft_s=self.ttft_s)
            yield pb.GenerateResponse(final=pb.FinalResult(finish_reason="length", prompt_tokens=len(ids),
                                                           timings=timings, prefill_instance="p",
                                                           decode_instance="d"))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def Abort(self, request, context):
        return pb.AbortResponse(found=False)

    async def GetClusterState(self, request, context):
        return pb.ClusterState(num_active_requests=self.active)


async def _with_server(script: ScriptedServer, body):
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(script, server)
    pb_grpc.add_AdminServicer_to_server(script, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:   # the SDK closes its channel on the way out
            result = await body(client)
        with pytest.raises(Exception):   # closed: no more calls
            await client.state()
        return result
    finally:
        await server.stop(0)


def test_open_loop_keeps_arrival_times_while_earlier_requests_are_slow():
    script = ScriptedServer(ttft_s=0.05, gap_s=0.02, slow_ttft_s=1.5)
    # the first request is slow (1.5 s to its first token); five more arrive while it waits
    specs = [RequestSpec(0.0, ScriptedServer.SLOW, 6)] + [RequestSpec(0.2 * i, 12, 6) for i in range(1, 6)]
    maker = PromptMaker(VOCAB, SPECIAL, seed=1)

    async def body(client):
        loop = asyncio.get_running_loop()
        t = loop.time()
        results, duration = await run_point(client, specs, maker, time_limit_s=20, progress=False)
        return t, results, duration

    t_call, results, duration = asyncio.run(_with_server(script, body))
    assert [r.status for r in results] == [OK] * 6
    arrivals = sorted(t for t, *_ in script.received)
    start = arrivals[0]
    for spec, seen in zip(specs, arrivals):
        assert seen - start == pytest.approx(spec.arrival_s, abs=0.08)   # on schedule, not after request 0
    assert all(r.send_lag_s < 0.05 for r in results)
    assert results[0].ttft_s == pytest.approx(1.55, abs=0.15)
    for r in results[1:]:
        assert r.ttft_s == pytest.approx(0.05, abs=0.08)
        assert r.n_out == 6 and r.tpot_s == pytest.approx(0.02, abs=0.015)
        assert r.e2e_s == pytest.approx(r.ttft_s + 5 * r.tpot_s)
        assert r.finish_reason == "length" and r.timings["prefill_s"] == pytest.approx(0.05)
    # what the server was asked: exact lengths, no special tokens, EOS ignored, max_tokens as drawn
    for (_, ids, max_tokens, ignore_eos), spec in zip(sorted(script.received, key=lambda x: x[0]), specs):
        assert len(ids) == spec.prompt_tokens and all(i not in SPECIAL for i in ids)
        assert max_tokens == spec.output_tokens and ignore_eos
    assert 1.6 < duration < 3.0


def test_time_limit_cancels_stragglers_and_leaves_late_arrivals_unsent():
    script = ScriptedServer(ttft_s=0.02, gap_s=0.01)
    specs = [RequestSpec(0.0, 12, 4), RequestSpec(0.1, ScriptedServer.STUCK, 4), RequestSpec(0.2, 12, 4),
             RequestSpec(5.0, 12, 4)]          # after the limit

    async def body(client):
        results, duration = await run_point(client, specs, PromptMaker(VOCAB, SPECIAL), time_limit_s=1.0,
                                            progress=False)
        idle = await wait_idle(client, timeout_s=5)
        return results, duration, idle

    results, duration, idle = asyncio.run(_with_server(script, body))
    assert [r.status for r in results] == [OK, CANCELLED, OK, UNSENT]
    assert 0.9 < duration < 2.0 and len(script.received) == 3
    assert idle and script.cancelled == 1          # the cancel reached the server: nothing left running
    s = summarize(results, SLO(1.0, 0.1), 4.0, duration)
    assert s["attainment"] == pytest.approx(0.5) and s["counts"][CANCELLED] == 1 and s["counts"][UNSENT] == 1


def test_sweep_reports_a_point_per_rate_and_the_goodput():
    # a server that gets slow past 2 in flight: TTFT grows with the rate, so the goodput is found
    class Saturating(ScriptedServer):
        SLOW = STUCK = -1

        async def Generate(self, request, context):
            self.ttft_s = 0.02 if self.active < 2 else 0.6
            async for resp in super().Generate(request, context):
                yield resp

    script = Saturating(ttft_s=0.02, gap_s=0.005)
    # nearly regular arrivals (burstiness 0.02): at 2 req/s a request (<= 0.66 s) overlaps at most one other
    spec = SweepSpec("code", (2.0, 40.0), 10, SLO(ttft_s=0.3, tpot_s=0.05), burstiness=0.02, seed=5, warmup=1,
                     refine=1, max_total_tokens=160)

    async def body(client):
        return await sweep(client.address, spec, PromptMaker(VOCAB, SPECIAL), "scripted", progress=False,
                           log=lambda *_: None)

    result = asyncio.run(_with_server(script, body))
    rates = [p["rate"] for p in result["points"]]
    assert rates == [2.0, 21.0, 40.0]                   # the sweep plus one bisection step
    att = {p["rate"]: p["attainment"] for p in result["points"]}
    assert att[2.0] >= 0.9 and att[40.0] < 0.9
    assert result["goodput"] == (21.0 if att[21.0] >= 0.9 else 2.0)
    assert all(len(p["requests"]) == 10 and p["idle_after"] for p in result["points"])
    assert not math.isnan(result["goodput_interpolated"])


# ---- tables, rescoring and plots from a result ------------------------------------------------

def _result(ttfts_by_mode: dict[str, list[float]]) -> dict:
    """A serve.json-shaped result: per mode, rate i+1 has the requests whose TTFTs are per_rate[i]."""
    modes = []
    for label, per_rate in ttfts_by_mode.items():
        points = []
        for i, ttfts in enumerate(per_rate):
            reqs = [_ok(t, t + 0.9, 10, j) for j, t in enumerate(ttfts)]   # TPOT 0.1
            p = summarize(reqs, SLO(1.0, 0.2), float(i + 1), 10.0)
            p["requests"] = [r.to_dict() for r in reqs]
            points.append(p)
        pairs = [(p["rate"], p["attainment"]) for p in points]
        modes.append({"label": label, "points": points, "goodput": goodput(pairs),
                      "goodput_interpolated": goodput_interpolated(pairs), "config": f"{label}.yaml"})
    return {"workload": "chatbot", "rates": [1.0, 2.0], "num_requests": 10, "slo": {"ttft_s": 1.0, "tpot_s": 0.2},
            "target": 0.9, "burstiness": 1.0, "seed": 0, "date_utc": "now", "commit": "abc",
            "loadavg_before": [0.1, 0, 0], "loadavg_after": [0.2, 0, 0], "modes": modes}


def test_rescore_and_tables_follow_the_slo(tmp_path):
    from cluster.bench.plots import plot_attainment, plot_latency_cdfs
    from cluster.bench.serve_report import markdown, rescore
    result = _result({"disaggregated": [[0.5] * 10, [0.8] * 9 + [3.0]],
                      "colocated": [[0.5] * 10, [1.5] * 5 + [0.5] * 5]})
    dis, col = result["modes"]
    assert (dis["goodput"], col["goodput"]) == (2.0, 1.0)
    # a TTFT SLO of 0.7 s: disaggregated's second point (TTFTs 0.8) now misses; a TPOT SLO under 0.1 fails all
    assert rescore(dis, SLO(0.7, 0.2), 0.9)[1] == 1.0
    assert rescore(dis, SLO(5.0, 0.05), 0.9) == ([(1.0, 0.0), (2.0, 0.0)], 0.0, 0.0)
    md = markdown(result)
    assert "| disaggregated | 2 | 2.00 | 2.00x |" in md and "| colocated | 1 |" in md
    assert "| 2 | **90%** (90% / 100%) | **50%** (50% / 100%) |" in md
    plot_attainment(result["modes"], 0.9, str(tmp_path / "a.png"))
    assert plot_latency_cdfs(result["modes"], SLO(1.0, 0.2), str(tmp_path / "c.png"), target=0.9) == 2.0
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "c.png").stat().st_size > 10_000
