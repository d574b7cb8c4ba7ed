"""`pdcluster bench serve`: open-loop load on a cluster, SLO attainment and goodput over a rate sweep.

    pdcluster bench serve --config deploy/bench-disagg.yaml,deploy/bench-colocated.yaml \\
        --workload chatbot --rates 0.5,1,1.5 --num-requests 40 --ttft-slo 1.5 --tpot-slo 0.15 --out DIR

For each config (one serving mode each) a cluster is started, warmed up, swept
over the rates and stopped; `--address` drives an already running cluster
instead, and `--endpoint http://HOST:PORT/v1 --model NAME` any OpenAI-compatible
server (ours, vLLM, ...) over streamed HTTP completions (cluster.bench.endpoint).
At each rate the same requests (lengths from `router.workload`, same seed at
every rate: only the arrival times change) are sent *open loop*: each one at
its arrival time whether or not earlier ones have finished, as its own asyncio
task. Prompts are random in-vocabulary token ids of exactly the drawn
length (no special tokens); the output length is forced with `ignore_eos` and
`max_tokens`. A rate point is bounded by `--time-limit`: at it, sending stops
and requests still in flight are cancelled (both count as SLO misses). The
cluster is left idle before the next point. Writes `serve.json` (every
request, the summaries, goodput per mode) and the plots (`cluster.bench.plots`).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster.bench.endpoint import EndpointClient
from cluster.bench.serve_metrics import (CANCELLED, FAILED, OK, SLO, BenchError, RequestResult, goodput,
                                         goodput_interpolated, next_bisection_rate, summarize)
from cluster.bench.serve_report import markdown
from cluster.client import AsyncClient, Chunk, Client, ClientError
from cluster.config import ClusterConfig, load_config, merge_sections
from cluster.local import Cluster
from engine.tokenizer import load_tokenizer
from engine.default_model import default_model_path
from engine.model_config import load_model_config
from router.workload import RequestSpec, Workload, load_trace, sample_requests

IDLE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class SweepSpec:
    workload: str | Workload           # a named workload or one built by hand
    rates: tuple[float, ...]
    num_requests: int
    slo: SLO
    burstiness: float = 1.0
    seed: int = 0
    trace: str | None = None          # a BurstGPT-layout CSV replaces the named workload's lengths
    time_limit_s: float | None = None  # per rate point; None: the arrivals' span + 60 s
    target: float = 0.9
    refine: int = 0                    # bisection steps between the last pass and the first miss
    warmup: int = 2                    # unmeasured requests before the first rate point
    max_total_tokens: int = 2048

    def __post_init__(self) -> None:
        if not self.rates or any(not (r > 0) for r in self.rates):
            raise BenchError(f"rates must be positive requests/s, got {list(self.rates)}")
        if self.num_requests < 1:
            raise BenchError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise BenchError(f"time_limit_s must be > 0, got {self.time_limit_s}")
        if self.refine < 0 or self.warmup < 0:
            raise BenchError("refine and warmup must be >= 0")

    @property
    def workload_name(self) -> str:
        if self.trace is not None:
            return self.trace
        return self.workload if isinstance(self.workload, str) else self.workload.name

    def requests(self, rate: float) -> list[RequestSpec]:
        if self.trace is None:
            return sample_requests(self.workload, rate, self.num_requests, seed=self.seed,
                                   burstiness=self.burstiness, max_total_tokens=self.max_total_tokens)
        return trace_requests(self.trace, rate, self.num_requests, self.max_total_tokens)

    def limit_for(self, specs: Sequence[RequestSpec]) -> float:
        return self.time_limit_s if self.time_limit_s is not None else (specs[-1].arrival_s if specs else 0) + 60


def trace_requests(path: str, rate: float, num_requests: int, max_total_tokens: int) -> list[RequestSpec]:
    """The first `num_requests` rows of a trace, time rescaled so that they arrive at `rate` on average;
    the trace keeps its own burstiness and lengths (outputs capped, then prompts, to `max_total_tokens`)."""
    specs = load_trace(path, max_requests=num_requests, max_output_tokens=max_total_tokens // 2,
                       max_prompt_tokens=max_total_tokens)
    span = specs[-1].arrival_s
    scale = (len(specs) - 1) / (span * rate) if span > 0 and len(specs) > 1 else 1.0
    return [RequestSpec(s.arrival_s * scale, min(s.prompt_tokens, max_total_tokens - s.output_tokens),
                        s.output_tokens) for s in specs]


class PromptMaker:
    """Random in-vocabulary token ids, no special tokens, seeded per request index."""

    def __init__(self, vocab_size: int, special_ids: Sequence[int], seed: int = 0) -> None:
        banned = set(int(i) for i in special_ids)
        self.allowed = [i for i in range(vocab_size) if i not in banned]
        if not self.allowed:
            raise BenchError("no token id is left once the special tokens are removed")
        self.seed = seed

    @classmethod
    def for_model(cls, model_path: str, seed: int = 0) -> PromptMaker:
        tok = load_tokenizer(model_path)
        special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
        return cls(load_model_config(model_path).vocab_size, sorted(special), seed)

    def ids(self, n: int, index: int, conversation: int | None = None, point: int = 0) -> list[int]:
        """`n` ids seeded by the request's index, or, for a turn of a multi-turn conversation,
        the first `n` of that conversation's stream: a later turn extends an earlier one. Each
        rate point of a sweep (`point`) gets its own ids, so a cluster with prefix caching finds
        nothing of an earlier point's requests in its cache; every mode gets the same ones."""
        key = f"r{index}" if conversation is None else f"c{conversation}"   # a warm-up's index is negative
        rng = random.Random(f"{self.seed}/{point}/{key}")   # (an int seed would ignore the sign)
        return [self.allowed[rng.randrange(len(self.allowed))] for _ in range(n)]

    def for_spec(self, spec: RequestSpec, index: int, point: int = 0) -> list[int]:
        return self.ids(spec.prompt_tokens, index, spec.conversation, point)


class _Progress:
    """tqdm when it is installed, else one line rewritten in place."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.n, self.total, self.desc, self.enabled, self._bar = 0, total, desc, enabled, None
        if enabled:
            try:
                from tqdm import tqdm              # optional: not a dependency of the project
                self._bar = tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stderr)
            except ImportError:
                pass

    def update(self) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled:
            print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


async def _one(client, r: RequestResult, ids: list[int], start: float, done: Callable[[], None]) -> None:
    """Send one request at once; fill `r` with what the client saw, timed from its scheduled arrival."""
    loop = asyncio.get_running_loop()
    scheduled = start + r.arrival_s
    r.send_lag_s = loop.time() - scheduled
    first = last = None
    try:
        async for item in client.stream(token_ids=ids, max_tokens=r.output_tokens, temperature=0.0,
                                        ignore_eos=True):
            if isinstance(item, Chunk):
                if item.token_ids:
                    last = loop.time()
                    first = first if first is not None else last
                    r.n_out += len(item.token_ids)
                continue
            r.finish_reason, r.timings = item.finish_reason, dict(item.metrics)
            r.prefill_instance, r.decode_instance = item.prefill_instance, item.decode_instance
        if first is None or r.finish_reason in ("error", "abort"):
            r.status, r.error = FAILED, f"finish_reason={r.finish_reason!r}, {r.n_out} tokens"
        else:
            r.status, r.ttft_s, r.e2e_s = OK, first - scheduled, last - scheduled
    except asyncio.CancelledError:
        r.status = CANCELLED
        raise
    except (ClientError, OSError, RuntimeError) as e:
        r.status, r.error = FAILED, str(e)[:300]
    finally:
        done()


async def run_point(client, specs: Sequence[RequestSpec], prompts: PromptMaker, time_limit_s: float,
                    progress: bool = True, desc: str = "", point: int = 0) -> tuple[list[RequestResult], float]:
    """Send `specs` open loop; returns every request's result and the point's duration in seconds.
    `client`: the SDK's AsyncClient, or an EndpointClient (HTTP), which sends its own way.
    `point`: the rate point's number in its sweep, which picks its prompts' ids (PromptMaker.ids)."""
    send = client.send if isinstance(client, EndpointClient) else functools.partial(_one, client)
    results = [RequestResult(i, s.arrival_s, s.prompt_tokens, s.output_tokens) for i, s in enumerate(specs)]
    ids = [prompts.for_spec(s, i, point) for i, s in enumerate(specs)]   # built before the clock starts
    bar = _Progress(len(results), desc, progress)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    deadline = start + time_limit_s
    tasks = []
    for r, prompt in zip(results, ids):
        at = start + r.arrival_s
        if at > deadline:
            break                       # the rest stay UNSENT: misses
        if at > loop.time():
            await asyncio.sleep(at - loop.time())
        tasks.append(asyncio.create_task(send(r, prompt, start, bar.update)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    bar.close()
    return results, loop.time() - start


async def wait_idle(client, timeout_s: float = IDLE_TIMEOUT_S) -> bool:
    """Until the router has no request and no instance holds work (bounded); False on timeout."""
    if isinstance(client, EndpointClient):
        return await client.wait_idle(timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = await client.state()
        if st.num_active_requests == 0 and all(i.num_running == 0 and i.num_waiting == 0 for i in st.instances):
            return True
        await asyncio.sleep(0.2)
    return False


async def warm_up(client, spec: SweepSpec, prompts: PromptMaker) -> None:
    """A few sequential requests of the workload's shapes: first-call costs stay out of the figures."""
    for i, s in enumerate(spec.requests(spec.rates[0])[:spec.warmup]):
        await client.complete(token_ids=prompts.ids(s.prompt_tokens, -1 - i), max_tokens=s.output_tokens,
                              temperature=0.0, ignore_eos=True)


async def sweep(address: str, spec: SweepSpec, prompts: PromptMaker, label: str, progress: bool = True,
                log: Callable[[str], None] = print, client=None,
                counters: Callable[[], dict[str, int]] | None = None) -> dict:
    """Every rate of `spec` (then `refine` bisection steps) against the cluster at `address`
    (or through `client`, an EndpointClient; it is closed at the end). `counters`: the workers'
    counters (WORKER_COUNTERS), whose growth over each rate point is recorded with it."""
    client = client or AsyncClient(address)
    points: list[dict] = []
    try:
        await warm_up(client, spec, prompts)
        await wait_idle(client)

        async def point(rate: float) -> None:
            specs = spec.requests(rate)
            before = counters() if counters is not None else None
            results, duration = await run_point(client, specs, prompts, spec.limit_for(specs), progress,
                                                f"{label} @ {rate:g} req/s", point=len(points))
            summary = summarize(results, spec.slo, rate, duration)
            summary["idle_after"] = await wait_idle(client)
            if before is not None:
                after = counters()
                w = summary["worker_counters"] = {k: after[k] - before[k] for k in after}
                log(f"{label:>18} @ {rate:6.3g} req/s: prefill computed {w['prompt_tokens'] - w['prefix_hit_tokens']} "
                    f"of {w['prompt_tokens']} prompt tokens, {w['kv_bytes_received'] / 2**20:.1f} MiB of KV moved "
                    f"({w['kv_tokens_skipped']} prompt tokens' KV found on the decode instance, not moved)")
            summary["requests"] = [r.to_dict() for r in results]
            points.append(summary)
            c = summary["counts"]
            log(f"{label:>18} @ {rate:6.3g} req/s: attainment {summary['attainment']:6.1%} (TTFT "
                f"{summary['ttft_attainment']:.0%}, TPOT {summary['tpot_attainment']:.0%}); "
                f"p90 TTFT {_fmt(summary['ttft_s']['p90'])} s, p90 TPOT {_fmt(summary['tpot_s']['p90'])} s; "
                f"{c[OK]} ok, {c[FAILED]} failed, {c[CANCELLED]} cancelled, {c['unsent']} unsent")

        for rate in spec.rates:
            await point(rate)
        for _ in range(spec.refine):
            rate = next_bisection_rate(_pairs(points), spec.target, min_gap=0.02 * max(spec.rates))
            if rate is None:
                break
            await point(round(rate, 4))
    finally:
        await client.close()
    points.sort(key=lambda p: p["rate"])
    return {"label": label, "points": points, "goodput": goodput(_pairs(points), spec.target),
            "goodput_interpolated": goodput_interpolated(_pairs(points), spec.target)}


def _pairs(points: list[dict]) -> list[tuple[float, float]]:
    return [(p["rate"], p["attainment"]) for p in points]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def mode_label(config: ClusterConfig) -> str:
    """The config's serving mode; a disaggregated one that prefills some requests on its decode
    instances is named after that choice (conditional, never)."""
    if config.mode == "disaggregated" and config.router.disaggregation != "always":
        return config.router.disaggregation
    return config.mode


# what every worker counts (worker_shell.base.stats): prompt tokens looked up in the prefix cache and
# found there (prefill computed the difference), KV bytes that reached decode instances, and the
# prompt tokens whose KV a decode instance's pull found in its own cache (not moved)
WORKER_COUNTERS = ("prompt_tokens", "prefix_hit_tokens", "kv_bytes_received", "kv_tokens_skipped")


def worker_counters(cluster: Cluster) -> dict[str, int]:
    """WORKER_COUNTERS summed over the cluster's live instances."""
    stats = cluster.worker_stats().values()
    return {k: sum(s.get(k, 0) for s in stats) for k in WORKER_COUNTERS}


def run_configs(config_paths: Sequence[str], spec: SweepSpec, progress: bool = True,
                log: Callable[[str], None] = print, overrides: dict | None = None) -> list[dict]:
    """Start each config's cluster in turn (`overrides` merged over each), sweep it, stop it."""
    modes = []
    merged = merge_sections({"router": {"port": 0, "http_port": 0}}, overrides or {})
    configs = [(path, load_config(path, merged)) for path in config_paths]   # all checked first
    labels = [mode_label(cfg) for _, cfg in configs]
    for i, (path, cfg) in enumerate(configs):
        label = labels[i] if labels.count(labels[i]) == 1 else f"{labels[i]} ({Path(path).stem})"
        prompts = PromptMaker.for_model(cfg.model.path or default_model_path(), spec.seed)
        log(f"--- {label} ({path}): starting the cluster")
        try:
            with Cluster(cfg, log=lambda m: log(f"    {m}")) as cluster:
                result = asyncio.run(sweep(cluster.address, spec, prompts, label, progress, log,
                                           counters=lambda: worker_counters(cluster)))
        except Exception as e:   # keep the other modes' results: the run is long; the error is reported
            log(f"--- {label}: FAILED: {type(e).__name__}: {e}")
            result = {"label": label, "points": [], "goodput": 0.0, "goodput_interpolated": 0.0,
                      "error": f"{type(e).__name__}: {e}"}
        result["config"] = path
        modes.append(result)
    return modes


def run_address(address: str, spec: SweepSpec, label: str, model: str | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> list[dict]:
    """Sweep a cluster that is already running; the prompts use `model`'s vocabulary (default: the
    model the router reports, when it is a local directory, else the default model)."""
    if model is None:
        with Client(address, timeout_s=30) as c:
            reported = c.state().model
        model = reported if os.path.isdir(reported) else default_model_path()
    prompts = PromptMaker.for_model(model, spec.seed)
    result = asyncio.run(sweep(address, spec, prompts, label, progress, log))
    result["config"] = address
    return [result]


def run_endpoint(endpoint: str, spec: SweepSpec, label: str, model: str | None = None,
                 tokenizer: str | None = None, token: str | None = None, ca_cert: str | None = None,
                 progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Sweep any OpenAI-compatible server; the prompts use `tokenizer`'s vocabulary (default: `model`
    when it is a local directory, else the default model)."""
    vocab = tokenizer or (model if model and os.path.isdir(model) else default_model_path())
    prompts = PromptMaker.for_model(vocab, spec.seed)

    async def run() -> dict:
        client = EndpointClient(endpoint, model, token, ca_cert)
        try:
            name = await client.resolve_model()
        except BaseException:
            await client.close()
            raise
        log(f"--- {label}: {endpoint}, model {name!r}")
        return await sweep(endpoint, spec, prompts, label, progress, log, client=client)

    result = asyncio.run(run())
    result["config"] = endpoint
    return [result]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write_results(out_dir: str, spec: SweepSpec, modes: list[dict], load_before: tuple, cdf_rate: float | None,
                  plot: bool = True) -> dict:
    """serve.json, tables.md, attainment.png and latency_cdf.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "workload": spec.workload_name, "rates": list(spec.rates), "num_requests": spec.num_requests,
        "slo": {"ttft_s": spec.slo.ttft_s, "tpot_s": spec.slo.tpot_s}, "target": spec.target,
        "burstiness": spec.burstiness, "seed": spec.seed,
        "time_limit_s": spec.time_limit_s, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(), "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "cpu_count": os.cpu_count(), "modes": modes,
    }
    (out / "serve.json").write_text(json.dumps(result, indent=1))
    (out / "tables.md").write_text(markdown(result))
    if plot:
        from cluster.bench.plots import plot_attainment, plot_latency_cdfs   # light start-up: matplotlib
        title = f"{result['workload']}: TTFT SLO {spec.slo.ttft_s:g} s, TPOT SLO {spec.slo.tpot_s:g} s"
        plot_attainment(modes, spec.target, str(out / "attainment.png"), title)
        plot_latency_cdfs(modes, spec.slo, str(out / "latency_cdf.png"), title, cdf_rate, spec.target)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `pdcluster bench serve` options."""
    g = p.add_argument_group("serve (pdcluster bench serve)")
    g.add_argument("--out", default="bench-results/serve", help="results directory (default: %(default)s)")
    g.add_argument("--config", default=None,
                   help="cluster YAML(s), comma-separated: each is started in turn and swept (one mode each)")
    g.add_argument("--address", default=None, help="drive this running router (host:port) instead")
    g.add_argument("--endpoint", default=None,
                   help="drive any OpenAI-compatible server instead (http://HOST:PORT/v1): streamed completions")
    g.add_argument("--label", default="cluster", help="with --address / --endpoint: the mode's name in the results")
    g.add_argument("--workload", default="chatbot", help="chatbot | code | summarization | multiturn")
    g.add_argument("--trace", default=None, help="BurstGPT-layout CSV: lengths and burstiness from it")
    g.add_argument("--rates", default="0.5,1", help="comma-separated request rates (req/s)")
    g.add_argument("--num-requests", type=int, default=40, help="requests per rate point")
    g.add_argument("--ttft-slo", type=float, default=None, help="seconds")
    g.add_argument("--tpot-slo", type=float, default=None, help="seconds")
    g.add_argument("--target", type=float, default=0.9, help="attainment that counts as meeting the SLO")
    g.add_argument("--burstiness", type=float, default=1.0, help="1 Poisson; > 1 burstier (Gamma)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--refine", type=int, default=0, help="bisection steps after the sweep")
    g.add_argument("--time-limit", type=float, default=None, help="seconds per rate point (default: span + 60)")
    g.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the sweep")
    g.add_argument("--cdf-rate", type=float, default=None, help="rate whose latencies the CDF plot shows")
    g.add_argument("--model", default=None, help="with --address: the model directory for the vocabulary; "
                   "with --endpoint: the model name requests carry (default: the first the server lists)")
    g.add_argument("--tokenizer", default=None,
                   help="with --endpoint: the model directory whose vocabulary the prompts use (default: --model "
                        "when it is a directory, else the default model)")
    g.add_argument("--token", default=None, help="with --endpoint: bearer token")
    g.add_argument("--ca-cert", default=None, help="with --endpoint: CA of the server's TLS certificate (PEM)")
    g.add_argument("--no-progress", action="store_true")


def parse_rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BenchError(f"--rates must be comma-separated numbers, got {text!r}") from None
    if not rates:
        raise BenchError("--rates is empty")
    return tuple(sorted(set(rates)))


def main(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.config, args.address, args.endpoint)) != 1:
        raise BenchError("bench serve needs exactly one of --config (start clusters), --address (a running "
                         "router) or --endpoint (any OpenAI-compatible server)")
    if args.ttft_slo is None or args.tpot_slo is None:
        raise BenchError("bench serve needs --ttft-slo and --tpot-slo (seconds)")
    spec = SweepSpec(args.workload, parse_rates(args.rates), args.num_requests, SLO(args.ttft_slo, args.tpot_slo),
                     burstiness=args.burstiness, seed=args.seed, trace=args.trace, time_limit_s=args.time_limit,
                     target=args.target, refine=args.refine, warmup=args.warmup)
    if args.trace is None:
        spec.requests(spec.rates[0])       # an unknown workload fails before any cluster starts
    load_before = os.getloadavg()
    if args.config is not None:
        modes = run_configs([c for c in args.config.split(",") if c], spec, not args.no_progress)
    elif args.endpoint is not None:
        modes = run_endpoint(args.endpoint, spec, args.label, args.model, args.tokenizer, args.token, args.ca_cert,
                             not args.no_progress)
    else:
        modes = run_address(args.address, spec, args.label, args.model, not args.no_progress)
    out = args.out
    write_results(out, spec, modes, load_before, args.cdf_rate)
    for m in modes:
        print(f"{m['label']}: goodput {m['goodput']:g} req/s (interpolated {m['goodput_interpolated']:.3g})")
    print(f"wrote {out}/serve.json, tables.md, attainment.png, latency_cdf.png")
    return 0
