"""One prefill instance on host B, one decode instance on host C, the router on host A.

The KV of every request crosses the B-C link (backend auto: zmq across nodes),
on a socket only the cluster's members can use; the tokens are those of the
in-process engine; a process on host B without the cluster's key gets nowhere.
"""
from __future__ import annotations

import json
import sys

import pytest

from cluster.bench.hosts import REPO
from engine import SamplingParams
from tests.multinode.conftest import base_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_NEW = 16
LONG = "The history of the printing press begins in the fifteenth century. " * 40 + "In short,"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a small village by the mountains, there lived an old clockmaker who", LONG]
FP32_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4   # the default model: layers x (K, V) x KV heads x head_dim x 4


@pytest.fixture(scope="module")
def cluster(driver, ray_hosts):
    config = base_config(ray_hosts.address, prefill={"placement": {"resources": {"host_b": 1}}},
                         decode={"placement": {"resources": {"host_c": 1}}})
    started = driver.call("start", config=config, timeout_s=300)
    try:
        yield started
    finally:
        driver.call("stop", timeout_s=120)


def test_each_pool_runs_on_the_host_its_placement_names(cluster, hosts):
    infos = cluster["infos"]
    assert infos["prefill-0"]["node_address"] == hosts.address("b")
    assert infos["decode-0"]["node_address"] == hosts.address("c")
    assert cluster["address"].startswith(f"{hosts.address('a')}:")   # router.host auto: A's own address
    assert infos["prefill-0"]["transfer_endpoint"].startswith(f"tcp://{hosts.address('b')}:")
    assert infos["prefill-0"]["data_endpoint"].startswith(f"tcp://{hosts.address('b')}:")
    assert infos["decode-0"]["command_endpoint"].startswith(f"tcp://{hosts.address('c')}:")
    assert cluster["reply_endpoint"].startswith(f"tcp://{hosts.address('a')}:")


def test_greedy_is_token_identical_to_the_engine(driver, cluster, llm):
    got = driver.call("complete", prompts=PROMPTS, max_tokens=MAX_NEW)["completions"]
    want = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    for prompt, g, w in zip(PROMPTS, got, want):
        assert g["token_ids"] == w.token_ids, prompt[:40]
        assert g["text"] == w.text and g["finish_reason"] == w.finish_reason
        assert (g["prefill_instance"], g["decode_instance"]) == ("prefill-0", "decode-0")
    assert got[0]["text"].strip().startswith("Paris")
    assert got[-1]["prompt_tokens"] > 400   # tens of MB of fp32 KV crossed the link


def test_the_kv_bytes_on_the_b_c_link_are_the_transfers(driver, cluster, hosts):
    before = driver.call("stats")["stats"]["decode-0"]["kv_received"]
    b0, c0 = hosts.link_bytes("b"), hosts.link_bytes("c")
    r = driver.call("complete", prompts=[LONG + " Again,"], max_tokens=2)["completions"][0]
    b1, c1 = hosts.link_bytes("b"), hosts.link_bytes("c")
    after = driver.call("stats")["stats"]["decode-0"]["kv_received"]
    assert set(after) == {"zmq"}, after   # across nodes: never shm
    pulls, moved = (after["zmq"][i] - before.get("zmq", [0, 0])[i] for i in (0, 1))
    assert pulls == 1 and moved == r["prompt_tokens"] * FP32_KV_BYTES_PER_TOKEN
    out_of_b, into_c = b1["out"] - b0["out"], c1["in"] - c0["in"]
    # the KV, plus TCP/IP and Ethernet headers (~4.6% at MTU 1500) and a little control traffic
    for name, counted in (("out of B", out_of_b), ("into C", into_c)):
        assert moved <= counted <= 1.10 * moved + 256 * 1024, f"{name}: {counted} bytes for {moved} bytes of KV"


def _stranger(hosts, ray_hosts, spec: dict) -> dict:
    r = hosts.run("b", [sys.executable, "-m", "tests.multinode.stranger", json.dumps(spec)], env=ray_hosts.env(),
                  cwd=str(REPO), timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_process_on_host_b_without_the_key_gets_nowhere(driver, cluster, hosts, ray_hosts, llm):
    infos, keys = cluster["infos"], cluster["keys"]
    targets = {
        "kv": {"endpoint": infos["prefill-0"]["transfer_endpoint"], "type": "DEALER"},
        "kv_data": {"endpoint": infos["prefill-0"]["data_endpoint"], "type": "DEALER"},
        "prefill_commands": {"endpoint": infos["prefill-0"]["command_endpoint"], "type": "PUSH"},
        "decode_commands": {"endpoint": infos["decode-0"]["command_endpoint"], "type": "PUSH"},
        "router_replies": {"endpoint": cluster["reply_endpoint"], "type": "PUSH"},
    }
    before = driver.call("stats")["stats"]
    tried = _stranger(hosts, ray_hosts, {"targets": targets, "server_key": keys["public"]})
    for name, ways in tried.items():
        for way, result in ways.items():
            assert not result["handshake"] and result["received"] == 0, (name, way, result)
    after = driver.call("stats")["stats"]
    # the injected prefill command never ran: no step, no block taken, nothing failed
    assert after["prefill-0"]["num_steps"] == before["prefill-0"]["num_steps"]
    assert after["prefill-0"]["num_free_blocks"] == after["prefill-0"]["num_blocks"]
    assert after["decode-0"]["num_failed_pulls"] == before["decode-0"]["num_failed_pulls"] == 0
    # the control: the same process holding the cluster's keys does get through
    member = _stranger(hosts, ray_hosts, {"targets": {k: targets[k] for k in ("kv", "kv_data")},
                                          "server_key": keys["public"], "member": keys})
    assert member["kv"]["member"]["handshake"] and member["kv_data"]["member_data"]["handshake"], member
    # and the cluster keeps serving
    got = driver.call("complete", prompts=PROMPTS[:1], max_tokens=8)["completions"][0]
    assert got["token_ids"] == llm.generate(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0.0))[0].token_ids


def _listening(hosts, name: str) -> set[str]:
    """Local address:port of every listening TCP socket in host `name` (gRPC's dual-stack
    sockets show an IPv4 address as [::ffff:a.b.c.d])."""
    out = hosts.run(name, ["ss", "-Hltn"]).stdout
    return {line.split()[3].replace("[::ffff:", "").replace("]:", ":") if "::ffff:" in line.split()[3]
            else line.split()[3] for line in out.splitlines() if line.strip()}


def test_every_socket_binds_its_node_address_never_all(cluster, hosts):
    infos = cluster["infos"]
    ours = {"a": [cluster["address"], cluster["reply_endpoint"]],
            "b": [infos["prefill-0"][k] for k in ("command_endpoint", "transfer_endpoint", "data_endpoint")],
            "c": [infos["decode-0"]["command_endpoint"]]}
    for name, endpoints in ours.items():
        listening = _listening(hosts, name)
        for endpoint in endpoints:
            addr, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
            assert addr == hosts.address(name)
            assert f"{addr}:{port}" in listening, (name, endpoint, listening)
            assert not {f"0.0.0.0:{port}", f"*:{port}", f"[::]:{port}"} & listening, (name, endpoint)
