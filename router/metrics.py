"""The router's Prometheus metrics, served at HTTP /metrics, named `pdcluster:...`.

Where vLLM has the concept, the metric has vLLM's name after the prefix and
its buckets, so dashboards and alerts written for `vllm:` carry over by
renaming the prefix. Two halves:

  * `RouterMetrics` is a RequestObserver (router/core.py): it sees each
    request's tokens as they stream and its end, and fills the histograms and
    counters (TTFT, inter-token latency, end-to-end, queue, prefill, decode,
    KV transfer time, token totals, requests by finish reason);
  * `_StateCollector` reads the core's views at scrape time: requests running
    and waiting and KV-cache use per instance (from the workers' last load
    snapshots), instances per pool by status, migrations, instance deaths and
    leases held.

Each router has its own registry, so two routers in one process (tests) do not
clash in the global one.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from router.core import RequestObserver
from router.request_state import RequestState

PREFIX = "pdcluster:"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# ours: a KV pull takes milliseconds on one node
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUSES = ("serving", "draining", "out_of_rotation", "dead")
# vLLM's request_success reasons are OpenAI's finish reasons
SUCCESS_REASON = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "abort": "abort"}


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


class RouterMetrics(RequestObserver):
    """Observes the core's requests; `render()` is the /metrics page."""

    def __init__(self, core, model_name: str, transfer_backend: str = "") -> None:
        self.core, self.model_name, self.backend = core, model_name, transfer_backend or "none"
        self.registry = r = CollectorRegistry(auto_describe=True)
        m = ["model_name"]
        max_len = core.admission.model.max_model_len

        def hist(name: str, doc: str, buckets, labels=m) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS).labels(model_name)
        self.itl = hist("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS).labels(model_name)
        self.e2e = hist("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS).labels(model_name)
        self.queue = hist("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                          REQUEST_LATENCY_BUCKETS).labels(model_name)
        self.prefill = hist("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for "
                            "request.", REQUEST_LATENCY_BUCKETS).labels(model_name)
        self.decode = hist("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request "
                           "(first token to last).", REQUEST_LATENCY_BUCKETS).labels(model_name)
        self.prompt_hist = hist("request_prompt_tokens", "Number of prefill tokens processed.",
                                buckets_1_2_5(max_len)).labels(model_name)
        self.gen_hist = hist("request_generation_tokens", "Number of generation tokens processed.",
                             buckets_1_2_5(max_len)).labels(model_name)
        self.transfer = hist("kv_transfer_time_seconds", "Histogram of the KV pull of each request that moved "
                             "from a prefill to a decode instance.", TRANSFER_BUCKETS,
                             ["model_name", "backend"]).labels(model_name, self.backend)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Number of prefill tokens processed.", m,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Number of generation tokens processed.",
                                         m, registry=r).labels(model_name)
        self.success = Counter(PREFIX + "request_success", "Count of successfully processed requests.",
                               ["model_name", "finished_reason"], registry=r)
        self.ended_by = Counter(PREFIX + "requests_ended", "Requests that left the router, by our finish "
                                "reason (eos, stop, length, context, abort) or error / cancelled.",
                                ["model_name", "reason"], registry=r)
        r.register(_StateCollector(core, model_name))
        self._last_token_at: dict[str, float] = {}

    # -- RequestObserver ---------------------------------------------------------------
    def tokens(self, st: RequestState, num_tokens: int, now: float) -> None:
        if num_tokens <= 0:
            return
        last = self._last_token_at.get(st.req_id)
        if last is None:   # the first token: the prompt has been prefilled
            self.ttft.observe(now - st.arrival)
            self.prompt_tokens.inc(len(st.prompt_ids))
        else:
            self.itl.observe(now - last)
        for _ in range(num_tokens - 1):   # tokens that came in one message: no time between them
            self.itl.observe(0.0)
        self._last_token_at[st.req_id] = now
        self.generation_tokens.inc(num_tokens)

    def ended(self, st: RequestState, reason: str, now: float) -> None:
        self._last_token_at.pop(st.req_id, None)
        self.ended_by.labels(self.model_name, reason).inc()
        if reason not in SUCCESS_REASON:   # failed or cancelled: no phase times worth recording
            return
        self.success.labels(self.model_name, SUCCESS_REASON[reason]).inc()
        self.e2e.observe(now - st.arrival)
        self.queue.observe(st.queue_s)
        self.prefill.observe(st.prefill_s)
        if st.first_token_at is not None and st.last_token_at is not None:
            self.decode.observe(st.last_token_at - st.first_token_at)
        if st.transfer_s:
            self.transfer.observe(st.transfer_s)
        self.prompt_hist.observe(len(st.prompt_ids))
        self.gen_hist.observe(st.num_output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges and counters the core already keeps, read when Prometheus scrapes."""

    def __init__(self, core, model_name: str) -> None:
        self.core, self.model_name = core, model_name

    def describe(self):   # no samples at registration: collect() reads live state
        return []

    def collect(self):
        core, model = self.core, self.model_name
        labels = ["model_name", "engine", "role"]
        running = GaugeMetricFamily(PREFIX + "num_requests_running", "Number of requests in model execution "
                                    "batches, per instance (its last load report).", labels=labels)
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting", "Number of requests waiting to be "
                                    "processed, per instance (its last load report).", labels=labels)
        usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "KV-cache usage per instance. 1 means 100 "
                                  "percent usage.", labels=labels)
        leases = GaugeMetricFamily(PREFIX + "kv_leases", "KV leases a prefill instance holds for decode "
                                   "instances to pull.", labels=labels)
        instances = GaugeMetricFamily(PREFIX + "instances", "Instances per pool (role) by status.",
                                      labels=["model_name", "role", "status"])
        counts: dict[tuple[str, str], int] = {}
        for v in core.views.values():
            status = core.instance_status(v)
            counts[v.role, status] = counts.get((v.role, status), 0) + 1
            load = v.load
            if load is None or v.dead:
                continue
            values = [model, v.name, v.role]
            running.add_metric(values, load.num_running)
            waiting.add_metric(values, load.num_waiting)
            if load.num_blocks:
                usage.add_metric(values, 1.0 - load.num_free_blocks / load.num_blocks)
            if v.role == "prefill":
                leases.add_metric(values, load.num_leases)
        for role in sorted({v.role for v in core.views.values()}):
            for status in STATUSES:
                instances.add_metric([model, role, status], counts.get((role, status), 0))
        active = GaugeMetricFamily(PREFIX + "router_requests", "Requests the router holds now (admitted, "
                                   "not yet ended).", labels=["model_name"])
        active.add_metric([model], len(core.requests))
        migrations = CounterMetricFamily(PREFIX + "request_migrations", "Requests moved to another instance "
                                         "after theirs died or lost their KV.", labels=["model_name"])
        migrations.add_metric([model], core.num_migrations)
        deaths = CounterMetricFamily(PREFIX + "instance_deaths", "Instances whose process died.",
                                     labels=["model_name"])
        deaths.add_metric([model], core.num_deaths)
        local = CounterMetricFamily(PREFIX + "local_prefills", "Requests prefilled on the decode instance "
                                    "that decodes them (router.disaggregation conditional / never).",
                                    labels=["model_name"])
        local.add_metric([model], core.num_local_prefills)
        scaling = CounterMetricFamily(PREFIX + "scaling_events", "Instances the autoscaler added (up) or "
                                      "removed (down), per pool.", labels=["model_name", "role", "direction"])
        for (role, direction), n in sorted(core.scaling_events.items()):
            scaling.add_metric([model, role, direction], n)
        yield from (running, waiting, usage, leases, instances, active, migrations, deaths, local, scaling)
