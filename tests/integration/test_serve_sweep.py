"""`pdcluster bench serve` end to end: a tiny sweep against a real local cluster (Ray + gRPC on 127.0.0.1)."""
from __future__ import annotations

import json

import pytest

from cluster.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = """\
model: {dtype: bfloat16}
prefill: {kv_cache_memory_gb: 0.2}
decode: {kv_cache_memory_gb: 0.2}
router: {port: 0, http_port: 0, drain_timeout_s: 5}
"""


def test_tiny_sweep_writes_sane_json_and_plots(tmp_path, capsys):
    from matplotlib.image import imread
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "out"
    rc = main(["bench", "serve", "--config", str(cfg), "--workload", "code", "--rates", "4,1",
               "--num-requests", "4", "--ttft-slo", "60", "--tpot-slo", "5", "--warmup", "1",
               "--time-limit", "120", "--out", str(out), "--no-progress"])
    assert rc == 0
    import ray   # only now: Ray reads its auth settings on import, and the cluster sets them
    assert "disaggregated: goodput 4 req/s" in capsys.readouterr().out
    assert not ray.is_initialized()                       # the cluster it started is gone

    result = json.loads((out / "serve.json").read_text())
    assert result["workload"] == "code" and result["slo"] == {"ttft_s": 60.0, "tpot_s": 5.0}
    [mode] = result["modes"]
    assert mode["label"] == "disaggregated" and mode["goodput"] == 4.0
    assert [p["rate"] for p in mode["points"]] == [1.0, 4.0]
    for point in mode["points"]:
        assert point["counts"]["ok"] == 4 and point["attainment"] == 1.0 and point["idle_after"]
        # the same lengths at every rate (same seed): only the arrivals differ
        assert [r["prompt_tokens"] for r in point["requests"]] == \
            [r["prompt_tokens"] for r in mode["points"][0]["requests"]]
        for r in point["requests"]:
            assert r["status"] == "ok" and r["n_out"] == r["output_tokens"] and r["finish_reason"] == "length"
            assert 0 < r["ttft_s"] < r["e2e_s"] and 0 < r["tpot_s"] < 5
            assert r["send_lag_s"] < 0.1
            assert r["prefill_instance"] == "prefill-0" and r["decode_instance"] == "decode-0"
            assert r["timings"]["prefill_s"] > 0 and r["timings"]["decode_s"] > 0
            # the client's TTFT covers the server's own, less the client's share of the path
            assert r["ttft_s"] >= r["timings"]["prefill_s"]
        assert point["ttft_s"]["p50"] <= point["ttft_s"]["p90"] <= point["ttft_s"]["p99"]
    for name in ("attainment.png", "latency_cdf.png"):
        img = imread(out / name)
        assert img.shape[0] > 300 and img.shape[1] > 800 and img.std() > 0.01   # drawn, not blank
