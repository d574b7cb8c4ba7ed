"""router.planner.profile: the JSON format, its validation, the least-squares fit, the TP/PP scaling."""
import json
import random

import pytest

from router.planner.profile import (FORMAT, PhaseModel, PlannerError, ProfileError, Scaling, derive,
                                    fit_decode, fit_prefill, load_profile, profile_from_dict)

SHIPPED = "router/planner/profiles/llama13b-a100-80g.json"


def make_profile_dict(**over) -> dict:
    d = {"format": FORMAT, "name": "toy", "source": "made up for tests",
         "model": {"name": "toy", "num_layers": 2, "weight_bytes": 1e9, "kv_bytes_per_token": 1e5},
         "hardware": {"name": "toy", "device_memory_gb": 2.0, "memory_utilization": 1.0},
         "plans": {"1x1": {"prefill": {"a": 0.01, "b": 1e-3, "c": 1e-7},
                           "decode": {"a": 0.02, "b": 1e-3, "c": 1e-6}}}}
    d.update(over)
    return d


def test_fit_recovers_known_prefill_coefficients():
    rng = random.Random(0)
    a, b, c = 0.004, 2.5e-4, 3e-8
    samples = []
    for _ in range(30):
        lens = [rng.randint(16, 1024) for _ in range(rng.randint(1, 6))]
        t = a + b * sum(lens) + c * sum(x * x for x in lens)
        samples.append((lens, t * (1 + rng.uniform(-0.002, 0.002))))
    m, err = fit_prefill(samples)
    assert m.a == pytest.approx(a, rel=0.1)
    assert m.b == pytest.approx(b, rel=0.02)
    assert m.c == pytest.approx(c, rel=0.1)
    assert err < 0.01


def test_fit_recovers_known_decode_coefficients_exactly_without_noise():
    a, b, c = 0.02, 5e-4, 2e-7
    samples = [(bs, ctx, a + b * bs + c * ctx) for bs in (1, 4, 16, 32) for ctx in (bs * 64, bs * 512)]
    m, err = fit_decode(samples)
    assert (m.a, m.b, m.c) == pytest.approx((a, b, c), rel=1e-6)
    assert err < 1e-9


def test_fit_never_returns_a_negative_coefficient():
    # Times that fall slightly with batch size: the batch term is dropped, not made negative.
    samples = [(bs, 100 * bs, 0.05 - 1e-5 * bs + 1e-7 * 100 * bs) for bs in (1, 2, 4, 8, 16)]
    m, _ = fit_decode(samples)
    assert min(m.a, m.b, m.c) >= 0


def test_fit_rejects_too_few_or_bad_samples():
    with pytest.raises(PlannerError, match="at least 3"):
        fit_decode([(1, 10, 0.1), (2, 20, 0.2)])
    with pytest.raises(PlannerError, match="positive"):
        fit_prefill([([10], 0.1), ([20], -0.2), ([30], 0.3)])


def test_round_trip_and_shipped_profile(tmp_path):
    p = profile_from_dict(make_profile_dict())
    again = profile_from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p
    shipped = load_profile(SHIPPED)
    assert shipped.kv_capacity_tokens(1, 1) > 10_000        # a 13B model leaves room for KV on one 80 GB GPU
    assert shipped.latency(1, 1).measured and not shipped.latency(2, 1).measured


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.pop("model"), "missing key model"),
    (lambda d: d["model"].pop("kv_bytes_per_token"), "model.kv_bytes_per_token"),
    (lambda d: d["hardware"].update(memory_utilization=1.5), "hardware.memory_utilization"),
    (lambda d: d["plans"]["1x1"]["decode"].update(b=-1), "plans.1x1.decode.b"),
    (lambda d: d["plans"]["1x1"]["prefill"].update(c="fast"), "plans.1x1.prefill.c"),
    (lambda d: d["plans"].update({"2by1": {}}), "plans.2by1"),
    (lambda d: d.update(format="v0"), "format"),
    (lambda d: d["hardware"].update(device_kind="tpu"), "hardware.device_kind"),
])
def test_bad_profile_names_the_key(mutate, key):
    d = make_profile_dict()
    mutate(d)
    with pytest.raises(ProfileError, match=key.replace(".", r"\.")):
        profile_from_dict(d)


def test_load_profile_errors_name_the_file(tmp_path):
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(str(bad))


def test_tp_and_pp_scaling_assumption():
    base = profile_from_dict(make_profile_dict()).latency(1, 1)
    s = Scaling(tp_efficiency=0.8, tp_step_latency_s=0.001, tp_s_per_token=1e-6, pp_stage_latency_s=0.002)
    t2 = derive(base, 2, 1, s)
    assert t2.prefill.b == pytest.approx(1e-3 / 1.6 + 1e-6)      # split over 2 ranks at 80%, plus all-reduce
    assert t2.decode.a == pytest.approx(0.02 / 1.6 + 0.001)
    p2 = derive(base, 1, 2, s)                                  # one pass is no shorter with stages
    assert p2.prefill(100, 1e4) == pytest.approx(base.prefill(100, 1e4) + 0.002)
    with pytest.raises(PlannerError):
        derive(base, 0, 1, s)


def test_kv_capacity_grows_with_devices_and_is_negative_when_weights_do_not_fit():
    p = profile_from_dict(make_profile_dict(model={"name": "big", "num_layers": 2, "weight_bytes": 3 * 2**30,
                                                   "kv_bytes_per_token": 1e5}))
    assert p.kv_capacity_tokens(1, 1) < 0
    assert p.kv_capacity_tokens(2, 1) > 0 and p.kv_capacity_tokens(2, 1) == p.kv_capacity_tokens(1, 2)
    assert isinstance(p.latency(1, 1).prefill, PhaseModel)


def test_planner_imports_no_torch_ray_or_grpc():
    import subprocess
    import sys
    code = ("import sys, router.planner, router.planner.search, router.planner.plan_file; "
            "bad = [m for m in ('torch', 'ray', 'grpc') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_profile_bench_measures_the_engine_and_writes_a_loadable_profile(tmp_path, monkeypatch, capsys):
    import cluster.bench.profile as bench
    monkeypatch.setattr(bench, "PREFILL_SHAPES", ([16], [64], [32] * 4, [128]))
    monkeypatch.setattr(bench, "DECODE_BATCHES", (1, 4))
    monkeypatch.setattr(bench, "DECODE_CONTEXTS", (32, 256))
    out = tmp_path / "p.json"
    data = bench.run(out=str(out), repeats=1)
    p = load_profile(str(out))
    assert p.device_kind == "cpu" and p.num_layers == 30
    assert p.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2          # bf16 KV of the default model
    assert p.kv_capacity_tokens(1, 1) == int(0.5 * 2**30 // p.kv_bytes_per_token)   # a worker's default KV
    assert len(data["samples"]["prefill"]) == 4 and len(data["samples"]["decode"]) == 4
    lat = p.latency(1, 1)
    assert lat.prefill(64, 64 * 64) > 0 and lat.decode(4, 4 * 256) > 0
    assert "1x1: prefill(s)" in capsys.readouterr().out


def test_interference_is_optional_round_trips_and_names_a_bad_key():
    assert profile_from_dict(make_profile_dict()).interference.none
    p = profile_from_dict(make_profile_dict(interference={"decode": {"prefill": 0.9}}))
    assert p.interference.factor("decode", ["prefill", "prefill"]) == pytest.approx(2.8)
    assert p.interference.factor("prefill", ["decode"]) == 1.0
    again = profile_from_dict(json.loads(json.dumps(p.to_dict())))
    assert again.interference.k == p.interference.k
    assert "interference" not in profile_from_dict(make_profile_dict()).to_dict()
    for bad, key in (({"decode": {"prefill": -0.1}}, "interference.decode.prefill"),
                     ({"decode": {"prefil": 0.1}}, "interference.decode"),
                     ({"colocated": {}}, "interference"), ([], "interference")):
        with pytest.raises(ProfileError, match=key):
            profile_from_dict(make_profile_dict(interference=bad))


def test_calibrated_scales_each_phase_of_every_plan_and_rejects_bad_factors():
    from router.planner.profile import calibrated
    p = profile_from_dict(make_profile_dict())
    c = calibrated(p, prefill=1.5, decode=2.0, note="a test run")
    assert c.latency(1, 1).prefill(100, 1e4) == pytest.approx(1.5 * p.latency(1, 1).prefill(100, 1e4))
    assert c.latency(1, 1).decode(4, 400) == pytest.approx(2.0 * p.latency(1, 1).decode(4, 400))
    assert c.latency(2, 1).decode(4, 400) > p.latency(2, 1).decode(4, 400)   # derived plans follow
    assert "prefill x1.500, decode x2.000 (a test run)" in c.source
    assert c.kv_capacity_tokens(1, 1) == p.kv_capacity_tokens(1, 1)
    assert calibrated(p).latency(1, 1) == p.latency(1, 1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(PlannerError, match="decode"):
            calibrated(p, decode=bad)
