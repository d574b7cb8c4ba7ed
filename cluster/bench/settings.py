"""SLOs and rate grids of the serving benchmarks, derived from this machine's measured profile.

The development VM is not always the same hardware: the run of 2026-11-22 was on
an AMD EPYC, and on 2026-12-04 the VM was an Intel Xeon with AMX, where a
512-token prefill took 0.27 s instead of 1.0 s. Fixed SLOs and rates would make
every request meet both SLOs at every rate on the faster machine, which measures
nothing. So `pdcluster bench results` (`make bench`) profiles the machine first,
and these rules turn that profile (the 1x1 plan: prefill(tokens, sum l^2),
decode(batch, context)) into the settings (docs/results.md, "SLOs"):

* TTFT SLO: 2x the TTFT alone of the workload's 90th-percentile prompt, i.e. its
  prefill plus the cluster's fixed cost of a request (router, gRPC, first
  token), rounded up. The target is 90% attainment, so that prompt must be
  servable.
* TPOT SLO: 2x the decode step at the batch a decode instance typically holds
  (`TPOT_BATCH`), each sequence holding the mean prompt plus half the mean
  output, rounded up.
* Rates: fractions of the capacity of one prefill + one decode instance: the
  lower of 1 / prefill(mean prompt) and the rate whose decode batch makes a
  step as long as the TPOT SLO (batch = rate x mean output x step).
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

from router.planner.profile import Profile
from router.workload import get_workload


@dataclass(frozen=True)
class Setting:
    rates: tuple[float, ...]
    num_requests: int
    ttft_slo_s: float
    tpot_slo_s: float
    time_limit_s: float      # per rate point: the arrivals' span fits, plus a bounded drain
    cdf_rate: float          # the rate whose latency distributions are plotted (where the modes part)
    capacity_rps: float      # of one prefill + one decode instance, which the rates are fractions of


NUM_REQUESTS = {"chatbot": 24, "summarization": 20, "code": 24}
TPOT_BATCH = {"chatbot": 4, "summarization": 2, "code": 4}
RATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25)
CDF_FRACTION = 0.5                 # the plotted distributions: the second rate
CLUSTER_OVERHEAD_S = 0.05          # TTFT alone through the cluster minus the profile's prefill
SLO_FACTOR = 2.0
DRAIN_S = 30.0                     # a rate point's limit: its arrivals' span x 1.5, plus this
LENGTH_DRAWS = 4000


def _round_up(x: float, step: float) -> float:
    return round(math.ceil(x / step - 1e-9) * step, 6)


def _nice_rate(x: float) -> float:
    """Two significant digits, so the grid reads well (0.94 -> 0.94, 3.78 -> 3.8)."""
    return float(f"{x:.2g}")


@functools.lru_cache(maxsize=None)
def length_stats(workload: str, seed: int = 0) -> tuple[float, float, float]:
    """(90th-percentile prompt, mean prompt, mean output) in tokens, over seeded draws."""
    wl = get_workload(workload)
    rng = random.Random(seed)
    prompts = sorted(wl.prompt.sample(rng) for _ in range(LENGTH_DRAWS))
    outputs = [wl.output.sample(rng) for _ in range(LENGTH_DRAWS)]
    return float(prompts[int(0.9 * (len(prompts) - 1))]), sum(prompts) / len(prompts), sum(outputs) / len(outputs)


def capacity_rps(profile: Profile, workload: str, tpot_slo_s: float) -> float:
    """Requests/s one prefill + one decode instance can take (the lower of the two phases)."""
    lat = profile.latency(1, 1)
    _, mean_prompt, mean_out = length_stats(workload)
    prefill_rps = 1.0 / lat.prefill(mean_prompt, mean_prompt ** 2)
    per_seq = mean_prompt + mean_out / 2
    d = lat.decode
    batch = (tpot_slo_s - d.a) / (d.b + d.c * per_seq)   # the batch whose step takes the TPOT SLO
    if batch <= 0:
        return prefill_rps
    return min(prefill_rps, batch / (mean_out * tpot_slo_s))


def settings_for(workload: str, profile: Profile) -> Setting:
    lat = profile.latency(1, 1)
    p90, mean_prompt, mean_out = length_stats(workload)
    ttft = _round_up(SLO_FACTOR * (lat.prefill(p90, p90 ** 2) + CLUSTER_OVERHEAD_S), 0.05)
    batch = TPOT_BATCH[workload]
    tpot = _round_up(SLO_FACTOR * lat.decode(batch, batch * (mean_prompt + mean_out / 2)), 0.025)
    cap = capacity_rps(profile, workload, tpot)
    rates = tuple(_nice_rate(f * cap) for f in RATE_FRACTIONS)
    n = NUM_REQUESTS[workload]
    return Setting(rates=rates, num_requests=n, ttft_slo_s=ttft, tpot_slo_s=tpot,
                   time_limit_s=round(1.5 * n / rates[0] + DRAIN_S),
                   cdf_rate=_nice_rate(CDF_FRACTION * cap), capacity_rps=cap)


FIDELITY_FRACTIONS = (0.25, 0.5, 0.65, 0.8, 1.3)     # the fidelity check's judged sweep
CALIBRATION_FRACTIONS = (0.25, 1.05)                 # and its two calibration points


def fidelity_rates(workload: str, profile: Profile) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(judged rates, calibration rates) of `pdcluster bench fidelity`, as fractions of the
    1P1D capacity (on the 2026-11-22 machine: 0.5, 1, 1.25, 1.5, 2.5 and 0.5, 2 req/s of chatbot)."""
    cap = settings_for(workload, profile).capacity_rps
    return (tuple(_nice_rate(f * cap) for f in FIDELITY_FRACTIONS),
            tuple(_nice_rate(f * cap) for f in CALIBRATION_FRACTIONS))


def describe(workload: str, s: Setting) -> str:
    """One line of how the settings came out (printed by the benchmarks, kept in their output)."""
    p90, mean_prompt, mean_out = length_stats(workload)
    return (f"{workload}: p90 prompt {p90:.0f} tokens, mean prompt {mean_prompt:.0f}, mean output {mean_out:.0f}; "
            f"TTFT SLO {s.ttft_slo_s:g} s, TPOT SLO {s.tpot_slo_s * 1e3:g} ms (decode batch "
            f"{TPOT_BATCH[workload]}); 1P1D capacity {s.capacity_rps:.2f} req/s; rates {list(s.rates)}")
