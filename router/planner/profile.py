"""Latency profiles: how long one prefill batch or one decode step takes, per parallelism plan.

The model (DistServe's, Appendix A): for an instance with tensor degree t and
pipeline degree p, the latency of one pass of a batch through all p stages is

    prefill(batch) = a + b * sum(l_i) + c * sum(l_i ** 2)      l_i: prompt lengths
    decode(step)   = a + b * batch_size + c * context_tokens   context: sum over the batch

`b` is the per-token linear work (the GEMMs), the prefill `c` the causal
attention's quadratic term, the decode `c` reading each cached KV token.

A profile is JSON (format "pdcluster-profile/1"):

    {"format": "pdcluster-profile/1", "name": ..., "source": "how the numbers were obtained",
     "model": {"name", "num_layers", "weight_bytes", "kv_bytes_per_token"},
     "hardware": {"name", "device_kind", "device_memory_gb", "memory_utilization",
                  "intra_node_gb_s", "inter_node_gb_s"},
     "scaling": {"tp_efficiency", "tp_step_latency_s", "tp_s_per_token", "pp_stage_latency_s"},
     "plans": {"1x1": {"prefill": {"a", "b", "c"}, "decode": {"a", "b", "c"}}, "2x1": ...},
     "interference": {"prefill": {"prefill": k, "decode": k}, "decode": {"prefill": k, "decode": k}}}

`plans` keys are "<t>x<p>". Plans that were not measured are derived from
1x1 with the scaling assumption (see `derive`): every term is split across the
t ranks at efficiency `tp_efficiency` (compute, weight and KV reads all shard),
TP adds an all-reduce latency per step and a per-token all-reduce cost, PP
adds a hand-off latency per stage boundary and does not shorten one pass (the
stages run one after another; PP raises throughput by overlapping batches,
which the simulator models).

`interference` (optional, default none) is for devices that share a memory
system, such as the cores of one CPU: a step of phase X runs (1 + k[X][Y])
times longer for each other instance running phase Y at the step's start
(`pdcluster profile` measures it with a neighbour process looping on the other
core). Separate GPUs do not slow each other's steps this way; leave it out.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

# the profiles that ship with the package, by name (`pdcluster plan --profile llama13b-a100-80g`)
PROFILES_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "profiles"))

FORMAT = "pdcluster-profile/1"
GIB = 2 ** 30


class PlannerError(ValueError):
    """Bad input to the planner: a profile, a cluster shape, an SLO, a plan."""


class ProfileError(PlannerError):
    """A profile file or value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class PhaseModel:
    """Latency of one pass (seconds) = a + b * x + c * y; x, y as in the module docstring."""
    a: float
    b: float
    c: float

    def __call__(self, x: float, y: float) -> float:
        return self.a + self.b * x + self.c * y

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "c": self.c}


@dataclass(frozen=True)
class PlanLatency:
    prefill: PhaseModel
    decode: PhaseModel
    measured: bool = True          # False: derived from 1x1 by the scaling assumption


@dataclass(frozen=True)
class Scaling:
    tp_efficiency: float = 0.9         # fraction of the ideal 1/t speed-up
    tp_step_latency_s: float = 0.0     # all-reduce latency per pass (all layers), at t > 1
    tp_s_per_token: float = 0.0        # all-reduce transfer per token per pass, at t = 2
    pp_stage_latency_s: float = 0.0    # activation hand-off per stage boundary


PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Interference:
    """k[phase][neighbour phase]: the fraction a step slows per neighbour instance busy with that phase."""
    k: dict = field(default_factory=lambda: {a: {b: 0.0 for b in PHASES} for a in PHASES})

    def factor(self, phase: str, neighbours) -> float:
        """A step's slowdown (>= 1) while `neighbours` (their phases) run beside it."""
        row = self.k[phase]
        return 1.0 + sum(row[n] for n in neighbours)

    @property
    def none(self) -> bool:
        return not any(v for row in self.k.values() for v in row.values())

    def to_dict(self) -> dict:
        return {a: dict(row) for a, row in self.k.items()}


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    model_name: str
    num_layers: int
    weight_bytes: float
    kv_bytes_per_token: float
    device_memory_gb: float            # per device (GiB)
    memory_utilization: float          # fraction usable for weights + KV
    plans: dict                        # (t, p) -> PlanLatency, as given
    scaling: Scaling = field(default_factory=Scaling)
    hardware_name: str = ""
    device_kind: str = "gpu"           # "gpu" or "cpu": a plan asks Ray for GPUs only on "gpu"
    intra_node_gb_s: float = 100.0     # GB/s between devices of one node
    inter_node_gb_s: float = 3.0       # GB/s between nodes
    interference: Interference = field(default_factory=Interference)

    def latency(self, t: int, p: int) -> PlanLatency:
        if (t, p) in self.plans:
            return self.plans[(t, p)]
        if (1, 1) not in self.plans:
            raise ProfileError(f"profile {self.name!r} has no plan {t}x{p} and no 1x1 to derive it from")
        return derive(self.plans[(1, 1)], t, p, self.scaling)

    def kv_capacity_tokens(self, t: int, p: int) -> int:
        """KV tokens an instance of t*p devices can hold (<= 0: the weights do not fit)."""
        usable = t * p * self.device_memory_gb * GIB * self.memory_utilization
        return int((usable - self.weight_bytes) // self.kv_bytes_per_token)

    def to_dict(self) -> dict:
        s = self.scaling
        return {
            "format": FORMAT, "name": self.name, "source": self.source,
            "model": {"name": self.model_name, "num_layers": self.num_layers,
                      "weight_bytes": self.weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token},
            "hardware": {"name": self.hardware_name, "device_kind": self.device_kind,
                         "device_memory_gb": self.device_memory_gb,
                         "memory_utilization": self.memory_utilization,
                         "intra_node_gb_s": self.intra_node_gb_s, "inter_node_gb_s": self.inter_node_gb_s},
            "scaling": {"tp_efficiency": s.tp_efficiency, "tp_step_latency_s": s.tp_step_latency_s,
                        "tp_s_per_token": s.tp_s_per_token, "pp_stage_latency_s": s.pp_stage_latency_s},
            "plans": {f"{t}x{p}": {"prefill": pl.prefill.to_dict(), "decode": pl.decode.to_dict()}
                      for (t, p), pl in sorted(self.plans.items())},
            **({} if self.interference.none else {"interference": self.interference.to_dict()}),
        }


def derive(base: PlanLatency, t: int, p: int, s: Scaling) -> PlanLatency:
    """A (t, p) plan from the 1x1 one under the stated scaling assumption."""
    if t < 1 or p < 1:
        raise PlannerError(f"tp and pp must be >= 1, got {t}x{p}")
    speed = t * s.tp_efficiency if t > 1 else 1.0
    comm_fixed = (s.tp_step_latency_s if t > 1 else 0.0) + s.pp_stage_latency_s * (p - 1)
    comm_token = s.tp_s_per_token * 2 * (t - 1) / t       # a ring all-reduce moves 2(t-1)/t of the data

    def scale(m: PhaseModel) -> PhaseModel:
        return PhaseModel(m.a / speed + comm_fixed, m.b / speed + comm_token, m.c / speed)
    return PlanLatency(scale(base.prefill), scale(base.decode), measured=False)


def calibrated(profile: Profile, prefill: float = 1.0, decode: float = 1.0, note: str = "") -> Profile:
    """`profile` with every plan's step times multiplied per phase: the offline profile brought to
    what serving steps really take (other processes on the cores, the machine's speed that day,
    batches of mixed lengths), with factors measured from a serving run
    (cluster/bench/fidelity.py)."""
    for name, f in (("prefill", prefill), ("decode", decode)):
        if not (math.isfinite(f) and f > 0):
            raise PlannerError(f"calibration factor for {name} must be a positive number, got {f!r}")

    def scale(m: PhaseModel, f: float) -> PhaseModel:
        return PhaseModel(m.a * f, m.b * f, m.c * f)
    plans = {k: PlanLatency(scale(pl.prefill, prefill), scale(pl.decode, decode), pl.measured)
             for k, pl in profile.plans.items()}
    source = f"{profile.source} Calibrated: prefill x{prefill:.3f}, decode x{decode:.3f}"
    return replace(profile, plans=plans, source=source + (f" ({note})" if note else ""))


# -- loading -------------------------------------------------------------------------------------

def load_profile(path: str) -> Profile:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ProfileError(f"cannot read profile {path!r}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"profile {path!r} is not valid JSON: {e}") from None
    try:
        return profile_from_dict(data)
    except ProfileError as e:
        raise ProfileError(f"profile {path!r}: {e}") from None


def profile_from_dict(data) -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(f"a profile must be a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ProfileError(f"format must be {FORMAT!r}, got {data.get('format')!r}")
    model, hw = _section(data, "model"), _section(data, "hardware")
    sc = data.get("scaling", {})
    if not isinstance(sc, dict):
        raise ProfileError("scaling must be an object")
    plans = _section(data, "plans")
    if not plans:
        raise ProfileError("plans must name at least one plan, e.g. \"1x1\"")
    return Profile(
        name=_str(data, "name", "name"), source=_str(data, "source", "source"),
        model_name=_str(model, "name", "model.name"),
        num_layers=int(_num(model, "num_layers", "model.num_layers", minimum=1)),
        weight_bytes=_num(model, "weight_bytes", "model.weight_bytes", minimum=0),
        kv_bytes_per_token=_num(model, "kv_bytes_per_token", "model.kv_bytes_per_token", positive=True),
        device_memory_gb=_num(hw, "device_memory_gb", "hardware.device_memory_gb", positive=True),
        memory_utilization=_num(hw, "memory_utilization", "hardware.memory_utilization", positive=True,
                                maximum=1.0),
        hardware_name=str(hw.get("name", "")),
        device_kind=_kind(hw),
        intra_node_gb_s=_num(hw, "intra_node_gb_s", "hardware.intra_node_gb_s", positive=True, default=100.0),
        inter_node_gb_s=_num(hw, "inter_node_gb_s", "hardware.inter_node_gb_s", positive=True, default=3.0),
        scaling=Scaling(
            tp_efficiency=_num(sc, "tp_efficiency", "scaling.tp_efficiency", positive=True, maximum=1.0,
                               default=0.9),
            tp_step_latency_s=_num(sc, "tp_step_latency_s", "scaling.tp_step_latency_s", minimum=0, default=0.0),
            tp_s_per_token=_num(sc, "tp_s_per_token", "scaling.tp_s_per_token", minimum=0, default=0.0),
            pp_stage_latency_s=_num(sc, "pp_stage_latency_s", "scaling.pp_stage_latency_s", minimum=0,
                                    default=0.0)),
        plans={parse_plan_key(k): _plan(v, f"plans.{k}") for k, v in plans.items()},
        interference=_interference(data.get("interference", {})),
    )


def _interference(value) -> Interference:
    if not isinstance(value, dict):
        raise ProfileError(f"interference must be an object, got {value!r}")
    unknown = set(value) - set(PHASES)
    if unknown:
        raise ProfileError(f"interference: unknown phase(s) {sorted(unknown)}; known: {list(PHASES)}")
    k = {}
    for phase in PHASES:
        row = value.get(phase, {})
        if not isinstance(row, dict):
            raise ProfileError(f"interference.{phase} must be an object, got {row!r}")
        unknown = set(row) - set(PHASES)
        if unknown:
            raise ProfileError(f"interference.{phase}: unknown phase(s) {sorted(unknown)}; known: {list(PHASES)}")
        k[phase] = {n: _num(row, n, f"interference.{phase}.{n}", minimum=0, default=0.0) for n in PHASES}
    return Interference(k)


def _kind(hw: dict) -> str:
    kind = hw.get("device_kind", "gpu")
    if kind not in ("gpu", "cpu"):
        raise ProfileError(f"hardware.device_kind must be 'gpu' or 'cpu', got {kind!r}")
    return kind


def parse_plan_key(key: str) -> tuple[int, int]:
    parts = str(key).split("x")
    if len(parts) != 2 or not all(x.isdigit() and int(x) >= 1 for x in parts):
        raise ProfileError(f"plans.{key}: a plan key is '<tp>x<pp>' with both >= 1, e.g. '2x1'")
    return int(parts[0]), int(parts[1])


def _plan(value, key: str) -> PlanLatency:
    if not isinstance(value, dict):
        raise ProfileError(f"{key} must be an object with prefill and decode")
    out = []
    for phase in ("prefill", "decode"):
        m = _section(value, phase, key)
        out.append(PhaseModel(*(_num(m, c, f"{key}.{phase}.{c}", minimum=0) for c in "abc")))
    return PlanLatency(out[0], out[1], measured=True)


def _section(data: dict, name: str, parent: str = "") -> dict:
    key = f"{parent}.{name}" if parent else name
    if name not in data:
        raise ProfileError(f"missing key {key}")
    if not isinstance(data[name], dict):
        raise ProfileError(f"{key} must be an object, got {data[name]!r}")
    return data[name]


def _str(data: dict, name: str, key: str) -> str:
    v = data.get(name)
    if not isinstance(v, str) or not v:
        raise ProfileError(f"{key} must be a non-empty string, got {v!r}")
    return v


def _num(data: dict, name: str, key: str, minimum: float | None = None, positive: bool = False,
         maximum: float | None = None, default: float | None = None) -> float:
    if name not in data:
        if default is not None:
            return default
        raise ProfileError(f"missing key {key}")
    v = data[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProfileError(f"{key} must be a finite number, got {v!r}")
    if positive and not v > 0:
        raise ProfileError(f"{key} must be > 0, got {v}")
    if minimum is not None and v < minimum:
        raise ProfileError(f"{key} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ProfileError(f"{key} must be <= {maximum}, got {v}")
    return float(v)


# -- fitting -------------------------------------------------------------------------------------

def fit_prefill(samples: list[tuple[list[int], float]]) -> tuple[PhaseModel, float]:
    """Least squares over (prompt lengths of one batch, seconds); returns the model and its relative RMSE."""
    rows = [(1.0, float(sum(ls)), float(sum(x * x for x in ls))) for ls, _ in samples]
    return _fit(rows, [t for _, t in samples], "prefill")


def fit_decode(samples: list[tuple[int, int, float]]) -> tuple[PhaseModel, float]:
    """Least squares over (batch size, total context tokens, seconds per step)."""
    rows = [(1.0, float(b), float(c)) for b, c, _ in samples]
    return _fit(rows, [t for _, _, t in samples], "decode")


def _fit(rows: list[tuple], times: list[float], phase: str) -> tuple[PhaseModel, float]:
    """Non-negative least squares by dropping a column whose coefficient comes out negative.

    A negative coefficient is noise (a latency does not fall with more work); with
    three columns dropping and refitting is the exact active-set answer often enough.
    """
    if len(rows) < 3:
        raise PlannerError(f"{phase}: need at least 3 samples to fit 3 coefficients, got {len(rows)}")
    if any(not (t > 0 and math.isfinite(t)) for t in times):
        raise PlannerError(f"{phase}: every measured time must be a positive number")
    x, y = np.array(rows), np.array(times)
    # Weight by 1/y so short and long samples count by relative error, not absolute.
    w = 1.0 / y
    active = [0, 1, 2]
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(coef)))
    full = [0.0, 0.0, 0.0]
    for i, c in zip(active, coef):
        full[i] = max(0.0, float(c))
    pred = x @ np.array(full)
    rel_rmse = float(np.sqrt(np.mean(((pred - y) / y) ** 2)))
    return PhaseModel(*full), rel_rmse


def resolve_profile(name: str) -> str:
    """A profile's path: `name` itself when it is a file, else the shipped profile of that name."""
    if os.path.exists(name):
        return name
    shipped = os.path.join(PROFILES_DIR, f"{name}.json")
    if os.path.exists(shipped):
        return shipped
    known = sorted(f[:-5] for f in os.listdir(PROFILES_DIR) if f.endswith(".json"))
    raise ProfileError(f"no profile file {name!r} and no shipped profile of that name (shipped: {known})")
