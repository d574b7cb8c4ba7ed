"""The one config object: frozen dataclasses composed into `ClusterConfig`, loaded from YAML.

    cfg = load_config("deploy/local.yaml")          # or ClusterConfig() for the defaults
    cfg = load_config(path, overrides={"router": {"port": 0}})

Every unknown key, wrong type or out-of-range value raises `ConfigError`
naming the key by its dotted path (`prefill.num_instances`). Environment
variables are read here once (PDCLUSTER_MODEL, PDCLUSTER_AUTH_TOKEN), nowhere else.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

import yaml

from engine.device import check_available as check_device
from engine.dtypes import DTYPE_NAMES
from engine.errors import ConfigError
from kv_transfer.backends import BACKENDS, ON_FAILURE
from router import modes
from router.planner.profile import ProfileError, resolve_profile
from worker_shell.faults import POINTS as FAULT_POINTS

CHUNKED_DEFAULT_BUDGET = 512           # Sarathi-Serve-sized token budget per step
DISAGGREGATION = ("always", "never", "conditional")


@dataclass(frozen=True)
class ModelSection:
    path: str | None = None            # a local HF model directory; None = the default model
    dtype: str = "bfloat16"
    max_model_len: int | None = None   # None = the model's own context
    device: str = "cpu"                # cpu, cuda or cuda:N: weights, KV cache and sampling (engine/device.py)

    def check(self, key: str) -> None:
        _one_of(self.dtype, DTYPE_NAMES, f"{key}.dtype")
        check_device(self.device, f"{key}.device")   # cuda without a usable GPU: an error here, at start
        if self.path is not None and not os.path.isdir(self.path):
            raise ConfigError(f"{key}.path: model directory {self.path!r} does not exist")
        if self.max_model_len is not None:
            _positive(self.max_model_len, f"{key}.max_model_len")


STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")   # Ray's placement group strategies


@dataclass(frozen=True)
class PlacementConfig:
    """Where the ranks of a pool's instances may run (cluster/placement.py). Each rank's
    bundle asks for `resources` besides its CPUs (custom resources a node was started with,
    `ray start --resources '{"host_b": 100}'`) and lands on a node carrying every `labels`
    pair (`ray start --labels host=b`; Ray's selector syntax, e.g. "in(b,c)", works too);
    `strategy` spreads or packs an instance's ranks. `instances`: per instance, more of
    the same (instance i of the pool takes entry i modulo their number), e.g. one prefill
    instance on each of two hosts."""
    strategy: str = "PACK"
    resources: dict | None = None       # {name: amount per rank}
    labels: dict | None = None          # {key: value}
    instances: list | None = None       # [{resources: ..., labels: ...}, ...]

    def check(self, key: str) -> None:
        _one_of(self.strategy, STRATEGIES, f"{key}.strategy")
        for name, value in (self.resources or {}).items():
            if not isinstance(name, str) or name in ("CPU", "GPU", "memory"):
                raise ConfigError(f"{key}.resources: {name!r} is not a custom resource name (CPU and GPU "
                                  f"come from num_threads and num_gpus)")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{key}.resources.{name} must be a number > 0, got {value!r}")
        for name, value in (self.labels or {}).items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise ConfigError(f"{key}.labels must map strings to strings, got {name!r}: {value!r}")
        for i, item in enumerate(self.instances or []):
            if not isinstance(item, dict) or set(item) - {"resources", "labels"}:
                raise ConfigError(f"{key}.instances[{i}] must be a mapping of resources and/or labels, got {item!r}")
            _build(PlacementConfig, item, f"{key}.instances[{i}]").check(f"{key}.instances[{i}]")

    def for_instance(self, slot: int) -> PlacementConfig:
        """The placement of the pool's instance in `slot` (0, 1, ...): its `instances` entry over the pool's."""
        if not self.instances:
            return self
        item = self.instances[slot % len(self.instances)]
        return PlacementConfig(self.strategy, {**(self.resources or {}), **(item.get("resources") or {})},
                               {**(self.labels or {}), **(item.get("labels") or {})})


@dataclass(frozen=True)
class PoolConfig:
    num_instances: int = 1
    num_threads: int = 1                # torch CPU threads per worker (and Ray CPUs it reserves)
    num_gpus: float = 0.0               # per rank, where GPUs exist
    tp_size: int = 1
    pp_size: int = 1
    kv_cache_memory_gb: float = 0.5
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    enable_prefix_caching: bool = False   # keep computed prompt blocks: a prompt over a cached prefix computes the rest
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def check(self, key: str) -> None:
        self.placement.check(f"{key}.placement")
        for name in ("num_instances", "num_threads", "tp_size", "pp_size", "block_size", "max_num_seqs",
                     "max_num_batched_tokens"):
            _positive(getattr(self, name), f"{key}.{name}")
        if self.enable_prefix_caching and self.tp_size * self.pp_size != 1:
            raise ConfigError(f"{key}.enable_prefix_caching: a {self.plan} instance cannot reuse a cached prefix "
                              f"yet (its prefill over a prefix runs on one rank only); use a 1 x 1 plan")
        if not self.kv_cache_memory_gb > 0 or not math.isfinite(self.kv_cache_memory_gb):
            raise ConfigError(f"{key}.kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not self.num_gpus >= 0 or not math.isfinite(self.num_gpus):
            raise ConfigError(f"{key}.num_gpus must be >= 0, got {self.num_gpus}")

    @property
    def plan(self) -> str:
        return f"tp{self.tp_size}-pp{self.pp_size}"


@dataclass(frozen=True)
class ColocatedPoolConfig(PoolConfig):
    """The one pool of the colocated modes: every instance prefills and decodes.

    `max_num_batched_tokens` is the tokens of one step; None takes the mode's
    default (4096 for whole prefills, CHUNKED_DEFAULT_BUDGET for chunked ones).
    """
    max_num_batched_tokens: int | None = None

    def budget(self, mode: str) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return CHUNKED_DEFAULT_BUDGET if mode == modes.COLOCATED_CHUNKED else PoolConfig.max_num_batched_tokens

    def check(self, key: str) -> None:
        PoolConfig.check(dataclasses.replace(self, max_num_batched_tokens=self.budget(modes.COLOCATED)), key)
        if self.tp_size * self.pp_size != 1:   # the colocated worker runs one rank
            raise ConfigError(f"{key}.tp_size/pp_size: colocated instances run 1 x 1 plans only "
                              f"(got {self.tp_size} x {self.pp_size})")


@dataclass(frozen=True)
class TransferConfig:
    backend: str = "auto"               # auto: shm zero copy within a node, zmq across nodes (per pair)
    lease_ttl_s: float = 30.0
    checksum: bool = False              # shm with checksum off reads the prefill cache in place
    compress: str | None = None         # None or "int8"
    stream_layers: bool = False         # prefill sends each layer's KV as soon as it is computed
    on_failure: str = "recompute"       # a pull that fails (prefill died, bad data): ON_FAILURE

    def check(self, key: str) -> None:
        _one_of(self.backend, BACKENDS, f"{key}.backend")
        _one_of(self.on_failure, ON_FAILURE, f"{key}.on_failure")
        if self.compress is not None:
            _one_of(self.compress, ("int8",), f"{key}.compress")
        if self.stream_layers and not (self.backend in ("zmq", "auto") or self.zero_copy):
            raise ConfigError(f"{key}.stream_layers needs backend zmq or auto, or shm with checksum false and no "
                              f"compress (zero copy); got backend {self.backend!r}")
        if not self.lease_ttl_s > 0 or not math.isfinite(self.lease_ttl_s):
            raise ConfigError(f"{key}.lease_ttl_s must be > 0, got {self.lease_ttl_s}")

    @property
    def zero_copy(self) -> bool:
        """shm (or auto) without checksum or compression: decode reads the prefill cache in place
        (one copy) on the prefill's node, so a prefill instance keeps its cache in shared memory."""
        return self.backend in ("shm", "auto") and not self.checksum and self.compress is None


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 50051                   # 0 picks a free port
    http_port: int | None = 8000        # the OpenAI-compatible HTTP API; 0 picks a free port, null: none
    max_active_requests: int = 256      # beyond this, Generate answers RESOURCE_EXHAUSTED
    request_timeout_s: float = 300.0    # a request with no progress for this long fails
    drain_timeout_s: float = 30.0       # on stop, wait this long for requests in flight
    migration_limit: int = 3            # times a request may move after its instance died or failed it
    breaker_failures: int = 3           # failed requests in a row that take an instance out of rotation
    breaker_cooldown_s: float = 10.0    # how long it stays out before one probe request may go to it
    served_model_name: str | None = None   # the model's id on the HTTP API; null: its directory's name
    # security: TLS on both fronts (PEM files, both or neither); with tls_client_ca, clients must
    # present a certificate signed by it (mutual TLS)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token: str | None = None       # bearer token every request must carry (env PDCLUSTER_AUTH_TOKEN)
    # per-request limits, checked on admission for every front door (null: the model's context)
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    max_stop_strings: int = 16
    max_stop_string_len: int = 256      # characters
    # mode disaggregated: where prompts are prefilled. always: the prefill pool; never: on the decode
    # instance that decodes them (in chunks); conditional: per request, whichever meets the SLOs
    # better (the `conditional` section)
    disaggregation: str = "always"

    def check(self, key: str) -> None:
        _one_of(self.disaggregation, DISAGGREGATION, f"{key}.disaggregation")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"{key}.port must be in [0, 65536), got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ConfigError(f"{key}.http_port must be in [0, 65536) or null, got {self.http_port}")
        if self.http_port is not None and self.http_port == self.port != 0:
            raise ConfigError(f"{key}.http_port and {key}.port are both {self.port}: give them different ports")
        _positive(self.max_active_requests, f"{key}.max_active_requests")
        if self.migration_limit < 0:
            raise ConfigError(f"{key}.migration_limit must be >= 0, got {self.migration_limit}")
        _positive(self.breaker_failures, f"{key}.breaker_failures")
        _finite_at_least(self.breaker_cooldown_s, 0.0, f"{key}.breaker_cooldown_s")
        if not self.request_timeout_s > 0 or not math.isfinite(self.request_timeout_s):
            raise ConfigError(f"{key}.request_timeout_s must be a finite number > 0, got {self.request_timeout_s}")
        if not self.drain_timeout_s >= 0 or not math.isfinite(self.drain_timeout_s):
            raise ConfigError(f"{key}.drain_timeout_s must be a finite number >= 0, got {self.drain_timeout_s}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError(f"{key}.served_model_name must not be blank")
        self._check_security(key)
        for name in ("max_prompt_tokens", "max_tokens_limit"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), f"{key}.{name}")
        _positive(self.max_stop_strings, f"{key}.max_stop_strings")
        _positive(self.max_stop_string_len, f"{key}.max_stop_string_len")

    def _check_security(self, key: str) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            raise ConfigError(f"{key}.{given} is set but {key}.{missing} is not: TLS needs both")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(f"{key}.tls_client_ca needs {key}.tls_cert and {key}.tls_key (mutual TLS runs on TLS)")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{key}.{name}: file {path!r} does not exist")
        if self.auth_token is not None:
            # it travels in an HTTP header: printable ASCII without spaces
            if not self.auth_token or not all(33 <= ord(c) < 127 for c in self.auth_token):
                raise ConfigError(f"{key}.auth_token must be non-empty printable ASCII without spaces")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class ConditionalConfig:
    """router.disaggregation conditional / never: local prefills on decode instances (router/conditional.py)."""
    ttft_slo_s: float = 1.0             # the targets the choice weighs each path against
    tpot_slo_s: float = 0.15
    local_prefill_tokens: int = 256     # prompt tokens a decode step carries at most (Sarathi-Serve chunk)
    profile: str = "smollm2-135m-cpu"   # latency profile of the model on this hardware (corrected live)
    remote_fits: float = 0.0            # a remote prefill predicted within this share of the TTFT SLO is kept

    def check(self, key: str) -> None:
        _finite_at_least(self.ttft_slo_s, 1e-6, f"{key}.ttft_slo_s")
        _finite_at_least(self.tpot_slo_s, 1e-6, f"{key}.tpot_slo_s")
        _positive(self.local_prefill_tokens, f"{key}.local_prefill_tokens")
        if isinstance(self.remote_fits, bool) or not (isinstance(self.remote_fits, (int, float))
                                                      and 0.0 <= self.remote_fits <= 1.0):
            raise ConfigError(f"{key}.remote_fits must be a number in [0, 1], got {self.remote_fits!r}")


@dataclass(frozen=True)
class RestartConfig:
    """A pool keeps its size: a dead instance is replaced after a backoff, at most
    `max_restarts` times per pool over the cluster's life."""
    max_restarts: int = 10
    backoff_s: float = 1.0              # before the first replacement; doubles per restart of the pool
    max_backoff_s: float = 30.0

    def check(self, key: str) -> None:
        if self.max_restarts < 0:
            raise ConfigError(f"{key}.max_restarts must be >= 0, got {self.max_restarts}")
        _finite_at_least(self.backoff_s, 0.0, f"{key}.backoff_s")
        _finite_at_least(self.max_backoff_s, self.backoff_s, f"{key}.max_backoff_s")

    def backoff(self, restarts_so_far: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** restarts_so_far)


@dataclass(frozen=True)
class FaultConfig:
    """For tests and drills only: a worker kills itself (SIGKILL) at a point of a request's life,
    or every step runs `step_delay_s` longer (a busy instance)."""
    die_at: str | None = None           # one of FAULT_POINTS
    instance: str | None = None         # that worker only (its name, e.g. decode-0); None: every one
    after: int = 1                      # at the n-th time the point is reached
    step_delay_s: float = 0.0

    def check(self, key: str) -> None:
        if self.die_at is not None:
            _one_of(self.die_at, FAULT_POINTS, f"{key}.die_at")
        _positive(self.after, f"{key}.after")
        _finite_at_least(self.step_delay_s, 0.0, f"{key}.step_delay_s")


@dataclass(frozen=True)
class PoolScaling:
    """One pool's bounds and pace under autoscaling."""
    min_instances: int = 1
    max_instances: int = 4
    upscale_delay_s: float = 10.0       # a proposal to grow must hold this long before it is applied
    downscale_delay_s: float = 60.0     # ... to shrink (longer: scaling down is the costly mistake)
    max_step: int = 1                   # instances added or removed per decision

    def check(self, key: str) -> None:
        _positive(self.min_instances, f"{key}.min_instances")
        if self.max_instances < self.min_instances:
            raise ConfigError(f"{key}.max_instances ({self.max_instances}) must be >= "
                              f"{key}.min_instances ({self.min_instances})")
        _finite_at_least(self.upscale_delay_s, 0.0, f"{key}.upscale_delay_s")
        _finite_at_least(self.downscale_delay_s, 0.0, f"{key}.downscale_delay_s")
        _positive(self.max_step, f"{key}.max_step")


@dataclass(frozen=True)
class AutoscalingConfig:
    """Pools that follow the load (router/autoscale.py: the policies; cluster/autoscaler.py: the actuator)."""
    policy: str = "none"                # none | load | slo
    interval_s: float = 5.0             # one decision this often
    window_s: float = 30.0              # observations cover the last this many seconds
    prefill: PoolScaling = field(default_factory=PoolScaling)
    decode: PoolScaling = field(default_factory=PoolScaling)
    colocated: PoolScaling = field(default_factory=PoolScaling)
    ttft_p90_s: float | None = None     # slo: the targets
    tpot_p90_s: float | None = None
    profile: str | None = None          # slo: a latency profile JSON (pdcluster profile) or a shipped name
    queued_tokens_high: int = 2048      # load: prefill grows above this many queued prompt tokens per instance
    queued_tokens_low: int = 128        # ... and shrinks below this
    kv_use_high: float = 0.8            # load: decode grows above this KV-cache use per instance
    kv_use_low: float = 0.2             # ... and shrinks below this
    max_total_instances: int | None = None   # budget: ranks over every pool (tp x pp per instance)
    max_cpus: int | None = None         # budget: CPUs over every pool (num_threads per rank)

    def check(self, key: str) -> None:
        _one_of(self.policy, ("none", "load", "slo"), f"{key}.policy")
        for name in ("interval_s", "window_s"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{key}.{name} must be a finite number > 0, got {getattr(self, name)}")
        for role in ("prefill", "decode", "colocated"):
            getattr(self, role).check(f"{key}.{role}")
        for name in ("ttft_p90_s", "tpot_p90_s"):
            if getattr(self, name) is not None:
                _finite_at_least(getattr(self, name), 1e-6, f"{key}.{name}")
        if self.policy == "slo" and (self.profile is None or (self.ttft_p90_s is None and self.tpot_p90_s is None)):
            raise ConfigError(f"{key}.policy slo needs {key}.profile and at least one of {key}.ttft_p90_s, "
                              f"{key}.tpot_p90_s")
        if not 0 <= self.queued_tokens_low <= self.queued_tokens_high:
            raise ConfigError(f"{key}.queued_tokens_low must be in [0, {key}.queued_tokens_high]")
        if not 0 <= self.kv_use_low <= self.kv_use_high <= 1:
            raise ConfigError(f"{key}: need 0 <= kv_use_low <= kv_use_high <= 1")
        for name in ("max_total_instances", "max_cpus"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), f"{key}.{name}")

    def bounds(self, role: str) -> PoolScaling:
        return getattr(self, role)


@dataclass(frozen=True)
class SecurityConfig:
    """CurveZMQ on every zmq socket of the cluster (kv_transfer/curve.py): a key pair made
    at start and handed to the workers in their actor arguments; a process without it can
    neither pull KV nor send a worker or the router a message. KV bytes cross on a socket of
    their own, members only but not encrypted, unless `encrypt_kv` (about 4x slower)."""
    curve: bool = True
    encrypt_kv: bool = False

    def check(self, key: str) -> None:
        if self.encrypt_kv and not self.curve:
            raise ConfigError(f"{key}.encrypt_kv needs {key}.curve (the keys it encrypts with)")


@dataclass(frozen=True)
class AffinityConfig:
    """DistServe's node affinity, as `pdcluster plan` writes it. high: every instance is placed
    on its own (KV crosses nodes). low: the pools are `num_units` units of equal parts; stage s
    of every prefill and decode instance of a unit sits on one node, so KV never leaves it."""
    regime: str = "high"
    num_units: int = 1

    def check(self, key: str) -> None:
        _one_of(self.regime, ("high", "low"), f"{key}.regime")
        _positive(self.num_units, f"{key}.num_units")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None          # None: start an embedded local Ray; else join this cluster
    host: str = "127.0.0.1"             # the address the embedded Ray and the router's sockets bind;
                                        # auto: this node's (workers always bind their node's)
    num_cpus: int | None = None         # logical CPUs of the embedded Ray (None: what the pools need)
    placement_timeout_s: float = 60.0   # a pool the cluster cannot place by then stops the start (ConfigError)

    def check(self, key: str) -> None:
        if self.num_cpus is not None:
            _positive(self.num_cpus, f"{key}.num_cpus")
        _finite_at_least(self.placement_timeout_s, 0.1, f"{key}.placement_timeout_s")


@dataclass(frozen=True)
class ClusterConfig:
    mode: str = modes.DISAGGREGATED   # router.modes: disaggregated | colocated | colocated_chunked
    model: ModelSection = field(default_factory=ModelSection)
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)
    colocated: ColocatedPoolConfig = field(default_factory=ColocatedPoolConfig)   # the colocated modes' pool
    transfer: TransferConfig = field(default_factory=TransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    conditional: ConditionalConfig = field(default_factory=ConditionalConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)   # tests only

    def check(self) -> ClusterConfig:
        _one_of(self.mode, modes.MODES, "mode")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.check(f.name)
        budget = self.colocated.budget(self.mode)
        if self.mode == modes.COLOCATED_CHUNKED and budget < self.colocated.max_num_seqs:
            # every running request decodes one token per step inside the budget: it must hold them all
            raise ConfigError(f"colocated.max_num_batched_tokens ({budget}) must be >= "
                              f"colocated.max_num_seqs ({self.colocated.max_num_seqs}) in mode colocated_chunked")
        self._check_plans()
        self._check_autoscaling()
        if self.local_prefills and self.decode.tp_size * self.decode.pp_size != 1:
            raise ConfigError(f"router.disaggregation {self.router.disaggregation}: a {self.decode.plan} decode "
                              f"instance cannot prefill locally yet (its chunked steps run on one rank); use 1 x 1")
        self._check_affinity()
        self._check_profiles()
        return self

    def _check_profiles(self) -> None:
        """The latency profiles the router will load: a missing one stops start-up here, by its key."""
        wanted = []
        if self.local_prefills:
            wanted.append(("conditional.profile", self.conditional.profile))
        if self.autoscaling.policy == "slo" and self.autoscaling.profile is not None:
            wanted.append(("autoscaling.profile", self.autoscaling.profile))
        for key, name in wanted:
            try:
                resolve_profile(name)
            except ProfileError as e:
                raise ConfigError(f"{key}: {e}") from None

    @property
    def local_prefills(self) -> bool:
        """Decode instances prefill some requests themselves (router.disaggregation never/conditional)."""
        return not self.is_colocated and self.router.disaggregation != "always"

    def _check_affinity(self) -> None:
        """Low node affinity: whole units, stage by stage (cluster/placement.py)."""
        a = self.affinity
        if a.regime != "low":
            return
        if self.is_colocated:
            raise ConfigError(f"affinity.regime low places prefill and decode instances together; mode {self.mode} "
                              f"has no such pools")
        if self.prefill.pp_size != self.decode.pp_size:
            raise ConfigError(f"affinity.regime low needs prefill.pp_size == decode.pp_size (stage s of both on one "
                              f"node), got {self.prefill.pp_size} and {self.decode.pp_size}")
        for role, pool in self.pools().items():
            if pool.num_instances % a.num_units:
                raise ConfigError(f"{role}.num_instances ({pool.num_instances}) must be a multiple of "
                                  f"affinity.num_units ({a.num_units})")
        for role, pool in self.pools().items():
            if pool.placement.instances or pool.placement.strategy != "PACK":
                raise ConfigError(f"affinity.regime low places every instance in its unit: {role}.placement may "
                                  f"set resources and labels only (no instances, no strategy)")
        if self.autoscaling.policy != "none":
            raise ConfigError("affinity.regime low keeps whole units in place: it does not autoscale yet "
                              "(set autoscaling.policy none)")

    def _check_autoscaling(self) -> None:
        a = self.autoscaling
        if a.policy == "none":
            return
        for role, pool in self.pools().items():
            b = a.bounds(role)
            if not b.min_instances <= pool.num_instances <= b.max_instances:
                raise ConfigError(f"{role}.num_instances ({pool.num_instances}) must be within "
                                  f"autoscaling.{role}.min_instances..max_instances ({b.min_instances}..{b.max_instances})")

    def _check_plans(self) -> None:
        """Multi-rank (tp x pp) instances run in the prefill and decode pools (cluster.parallel_worker)."""
        if self.is_colocated and self.colocated.tp_size * self.colocated.pp_size != 1:
            raise ConfigError(f"colocated.tp_size/pp_size: a colocated instance runs a 1 x 1 plan only yet "
                              f"(got {self.colocated.tp_size} x {self.colocated.pp_size})")
        if not self.is_colocated and self.transfer.stream_layers and self.prefill.tp_size * self.prefill.pp_size != 1:
            raise ConfigError(f"transfer.stream_layers: a {self.prefill.plan} prefill instance does not stream "
                              f"layers (its KV is gathered on rank 0 after the forward); set it false")

    @property
    def is_colocated(self) -> bool:
        return modes.is_colocated(self.mode)

    def pools(self) -> dict[str, PoolConfig]:
        """The pools this mode runs, by role."""
        if self.is_colocated:
            return {"colocated": self.colocated}
        return {"prefill": self.prefill, "decode": self.decode}

    def replace(self, **sections: dict) -> ClusterConfig:
        """A copy with some keys changed: cfg.replace(router={"port": 0})."""
        return from_dict(merge_sections(to_dict(self), sections))


def load_config(path: str | None = None, overrides: dict | None = None) -> ClusterConfig:
    """Read a YAML file (None: the defaults), apply overrides, check every value."""
    data: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path!r}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config {path!r} is not UTF-8 text: {e.reason} at byte {e.start}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path!r} must be a mapping of sections, got {type(data).__name__}")
    model = data.get("model")
    if os.environ.get("PDCLUSTER_MODEL") and (model is None or isinstance(model, dict) and "path" not in model):
        data = merge_sections(data, {"model": {"path": os.environ["PDCLUSTER_MODEL"]}})
    router = data.get("router")
    if os.environ.get("PDCLUSTER_AUTH_TOKEN") and (router is None or isinstance(router, dict)
                                                   and router.get("auth_token") is None):
        data = merge_sections(data, {"router": {"auth_token": os.environ["PDCLUSTER_AUTH_TOKEN"]}})
    return from_dict(merge_sections(data, overrides or {}))


def from_dict(data: dict) -> ClusterConfig:
    return _build(ClusterConfig, data, "").check()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _build(cls, data, key: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else name
        kwargs[name] = _coerce(hints[name], value, sub)
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        if value is None:   # a section with every key commented out: its defaults
            return hint()
        return _build(hint, value, key)
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must not be empty")
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str)
    elif base in (dict, list):
        ok = isinstance(value, base)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{key} must be {base.__name__}, got {value!r}")
    return value


def merge_sections(base: dict, extra: dict) -> dict:
    """`extra` over `base`, section by section (nested mappings merge, other values replace)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_sections(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _positive(value: int, key: str) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")


def _finite_at_least(value: float, low: float, key: str) -> None:
    if not value >= low or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number >= {low}, got {value}")


def _one_of(value, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
