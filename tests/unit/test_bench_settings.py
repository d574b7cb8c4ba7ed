"""cluster/bench/settings.py: SLOs and rates follow the machine's profile by the stated rules."""
import pytest

from cluster.bench.settings import capacity_rps, fidelity_rates, length_stats, settings_for
from router.planner.profile import calibrated, load_profile

PROFILE = "router/planner/profiles/smollm2-135m-cpu.json"


@pytest.mark.parametrize("workload", ["chatbot", "summarization"])
def test_slos_are_twice_the_single_request_latencies_rounded_up(workload):
    profile = load_profile(PROFILE)
    lat = profile.latency(1, 1)
    s = settings_for(workload, profile)
    p90, mean_prompt, mean_out = length_stats(workload)
    ttft_alone = lat.prefill(p90, p90 ** 2) + 0.05
    assert 2 * ttft_alone <= s.ttft_slo_s < 2 * ttft_alone + 0.05
    b = {"chatbot": 4, "summarization": 2}[workload]
    step = lat.decode(b, b * (mean_prompt + mean_out / 2))
    assert 2 * step <= s.tpot_slo_s < 2 * step + 0.025
    assert list(s.rates) == sorted(s.rates) and len(s.rates) == 5
    # the grid brackets the 1P1D capacity: from a quarter of it to past it
    cap = capacity_rps(profile, workload, s.tpot_slo_s)
    assert s.rates[0] == pytest.approx(cap / 4, rel=0.06) and s.rates[-1] > cap
    assert s.time_limit_s > 1.5 * s.num_requests / s.rates[0]   # the slowest point's arrivals fit


def test_a_faster_machine_gets_tighter_slos_and_higher_rates():
    """The reason the settings are derived: a 3x faster prefill (the AMX machine) moves both."""
    slow = load_profile(PROFILE)
    fast = calibrated(slow, prefill=1 / 3, decode=1.0)
    for wl in ("chatbot", "summarization"):
        a, b = settings_for(wl, slow), settings_for(wl, fast)
        assert b.ttft_slo_s < a.ttft_slo_s / 2
        assert b.tpot_slo_s == a.tpot_slo_s                    # decode unchanged
        assert b.rates[0] >= a.rates[0]
    # summarization is prefill-bound on the slow profile, so its rates follow the prefill;
    # chatbot is bound by its decode there, so its rates stay
    assert settings_for("summarization", fast).rates[0] > 2 * settings_for("summarization", slow).rates[0]
    assert settings_for("chatbot", fast).rates == settings_for("chatbot", slow).rates


def test_length_stats_are_the_workloads_seeded_draws():
    p90, mean_prompt, mean_out = length_stats("summarization")
    assert length_stats("summarization") == (p90, mean_prompt, mean_out)
    assert 700 < p90 < 900 and 500 < mean_prompt < 580 and 20 < mean_out < 32    # docs/workloads.md


def test_fidelity_rates_match_the_hand_picked_grid_on_the_profile_it_was_picked_for():
    judged, cal = fidelity_rates("chatbot", load_profile(PROFILE))
    for got, old in zip(judged + cal, (0.5, 1, 1.25, 1.5, 2.5) + (0.5, 2)):
        assert got == pytest.approx(old, rel=0.07)
