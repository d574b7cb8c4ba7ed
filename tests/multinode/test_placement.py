"""Where pools run across the test hosts, and what start-up refuses.

  - 2 prefill instances (one on B, one on C: per-instance placement) + 1 decode
    on C (a node label): backend auto copies zero copy from the prefill beside
    it and takes the other's KV over zmq, per pair; then host B loses its Ray
    node while requests run, and they finish on C;
  - a tp2 decode instance whose two ranks sit on B and C (STRICT_SPREAD), its
    TCPStore on rank 0's node address;
  - a plan with low node affinity served with `pdcluster serve --plan --address`
    from host A: prefill and decode share a node; a client on host B;
  - a placement no node can meet, and shm across nodes: a ConfigError, quickly.
"""
from __future__ import annotations

import queue
import subprocess
import sys
import time

import pytest
import yaml

from cluster.bench.hosts import REPO, line_queue, stop
from engine import SamplingParams
from tests.multinode.conftest import base_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Hi",
           "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
           "The history of the printing press begins in the fifteenth century. " * 12 + "In short,"]
MAX_NEW = 12


def _greedy(llm, prompts, n=MAX_NEW):
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0))]


def test_two_prefill_hosts_one_decode_each_pair_takes_its_own_way(driver, ray_hosts, hosts, llm):
    config = base_config(ray_hosts.address,
                         prefill={"num_instances": 2, "placement": {"instances": [{"resources": {"host_b": 1}},
                                                                                  {"resources": {"host_c": 1}}]}},
                         decode={"placement": {"labels": {"host": "c"}}})
    started = driver.call("start", config=config, timeout_s=300)
    try:
        infos = started["infos"]
        assert [infos[n]["node_address"] for n in ("prefill-0", "prefill-1", "decode-0")] == \
            [hosts.address("b"), hosts.address("c"), hosts.address("c")]
        got = driver.call("complete", prompts=PROMPTS, max_tokens=MAX_NEW, concurrent=True)["completions"]
        assert [g["token_ids"] for g in got] == _greedy(llm, PROMPTS)
        used = {g["prefill_instance"] for g in got}
        assert used == {"prefill-0", "prefill-1"}, used   # concurrent requests spread over both
        received = driver.call("stats")["stats"]["decode-0"]["kv_received"]
        # prefill-1 shares decode-0's node: zero copy; prefill-0 is on B: zmq over the link
        by_way = {"shm": sum(g["prefill_instance"] == "prefill-1" for g in got),
                  "zmq": sum(g["prefill_instance"] == "prefill-0" for g in got)}
        assert {way: received.get(way, [0])[0] for way in by_way} == by_way, received
        _lose_host_b_while_serving(driver, ray_hosts, llm)
    finally:
        try:
            driver.call("stop", timeout_s=120)
        finally:
            if "b" not in ray_hosts.procs:   # host B's node is back for the tests after this one
                ray_hosts.start_node("b")


def _lose_host_b_while_serving(driver, ray_hosts, llm) -> None:
    """Host B's Ray node dies (every process on B killed) with requests in flight: prefill-0 is
    marked dead and every request finishes on the instances left, token for token."""
    prompts = [f"Request {i}: " + PROMPTS[-1] for i in range(8)]
    driver.send("complete", prompts=prompts, max_tokens=MAX_NEW, concurrent=True)
    time.sleep(1.0)   # long prompts: both prefill instances are busy now
    ray_hosts.kill_node("b")
    reply = driver.answer("complete", timeout_s=300)
    assert reply["ok"], reply
    assert [g["token_ids"] for g in reply["completions"]] == _greedy(llm, prompts)
    deaths = driver.call("deaths")["deaths"]
    assert [d["name"] for d in deaths] == ["prefill-0"], deaths


def test_a_tp2_decode_instance_with_one_rank_on_each_host(driver, ray_hosts, hosts, llm):
    config = base_config(ray_hosts.address, prefill={"placement": {"resources": {"host_b": 1}}},
                         decode={"tp_size": 2, "placement": {"strategy": "STRICT_SPREAD"}})
    started = driver.call("start", config=config, timeout_s=400)
    try:
        rank0, rank1 = started["infos"]["decode-0"], started["rank_infos"]["decode-0.rank1"]
        assert {rank0["node_address"], rank1["node_address"]} == {hosts.address("b"), hosts.address("c")}
        store_addr, store_port = rank0["store_address"].rsplit(":", 1)
        assert store_addr == rank0["node_address"]   # the TCPStore listens on rank 0's node address only
        name = "b" if store_addr == hosts.address("b") else "c"
        listening = hosts.run(name, ["ss", "-Hltn"]).stdout
        assert f"{store_addr}:{store_port} " in listening and f"*:{store_port} " not in listening
        assert f"0.0.0.0:{store_port} " not in listening
        got = driver.call("complete", prompts=PROMPTS, max_tokens=MAX_NEW)["completions"]
        assert [g["token_ids"] for g in got] == _greedy(llm, PROMPTS)
    finally:
        driver.call("stop", timeout_s=120)


def test_a_placement_no_node_meets_stops_start_up_with_a_clear_error(driver, ray_hosts):
    config = base_config(ray_hosts.address, prefill={"placement": {"resources": {"host_z": 1}}},
                         ray={"placement_timeout_s": 5})
    t0 = time.monotonic()
    reply = driver.request("start", config=config, timeout_s=120)
    assert not reply["ok"] and "ConfigError" in reply["error"], reply
    assert "cannot place prefill-0" in reply["error"] and "host_z" in reply["error"]
    assert time.monotonic() - t0 < 60   # bounded: no hang


def test_shm_across_nodes_is_a_start_up_error(driver, ray_hosts):
    config = base_config(ray_hosts.address, transfer={"backend": "shm"},
                         prefill={"placement": {"resources": {"host_b": 1}}},
                         decode={"placement": {"resources": {"host_c": 1}}})
    reply = driver.request("start", config=config, timeout_s=180)
    assert not reply["ok"] and "backend shm works within one node only" in reply["error"], reply


def _wait_for(q: queue.Queue, marker: str, timeout_s: float, seen: list) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            raise AssertionError("pdcluster serve exited:\n" + "".join(seen[-40:]))
        seen.append(line)
        if marker in line:
            return line
    raise AssertionError(f"no {marker!r} from pdcluster serve in {timeout_s:.0f}s:\n" + "".join(seen[-40:]))


def test_pdcluster_serve_a_low_affinity_plan_from_host_a_and_generate_from_host_b(hosts, ray_hosts, llm, tmp_path):
    config = base_config(ray_hosts.address)
    config.pop("ray")   # given on the command line, as the README says
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(config))
    # what `pdcluster plan --affinity low` writes: the pools of one unit and the regime
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({
        "prefill": {"num_instances": 1, "tp_size": 1, "pp_size": 1},
        "decode": {"num_instances": 1, "tp_size": 1, "pp_size": 1},
        "affinity": {"regime": "low", "num_units": 1}}))
    serve = hosts.popen("a", [sys.executable, "-m", "cluster.cli", "serve", "--config", str(tmp_path / "cluster.yaml"),
                              "--plan", str(tmp_path / "plan.yaml"), "--address", ray_hosts.address],
                        env=ray_hosts.env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True)
    seen: list[str] = []
    try:
        q = line_queue(serve.stdout)
        line = _wait_for(q, "serving on", 300, seen)
        # "serving on HOST:PORT (gRPC), OpenAI-compatible HTTP on http://HOST:PORT/v1; Ctrl-C ..."
        address = line.split("serving on ")[1].split(" ")[0]
        assert f"http://{hosts.address('a')}:" in line   # router.host auto resolved for the HTTP API too
        assert address.startswith(f"{hosts.address('a')}:")
        ready = [s for s in seen if " ready (" in s]
        nodes = {s.split(" on ")[-1].strip(" )\n") for s in ready}
        assert len(ready) == 2 and len(nodes) == 1, ready   # the unit's prefill and decode share a node
        prompt = "The capital of France is"
        gen = hosts.run("b", [sys.executable, "-m", "cluster.cli", "generate", prompt, "--raw", "--address", address,
                              "--max-tokens", str(MAX_NEW)], env=ray_hosts.env(), cwd=str(REPO), timeout=120)
        want = llm.generate([prompt], SamplingParams(max_tokens=MAX_NEW, temperature=0.0))[0]
        assert gen.stdout == want.text
        assert "on prefill-0" in gen.stderr and "on decode-0" in gen.stderr
        serve.send_signal(2)   # Ctrl-C: drains and stops
        _wait_for(q, "stopped", 120, seen)
        assert serve.wait(60) == 0
    finally:
        stop(serve)
