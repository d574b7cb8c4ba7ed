"""cluster/config.py: YAML -> frozen dataclasses, and a ConfigError naming the bad key or file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import kv_transfer
from cluster import config as C
from cluster.config import ClusterConfig, ConfigError, PoolConfig, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_model_env(monkeypatch):
    """Tests see no PDCLUSTER_MODEL unless they set it."""
    monkeypatch.delenv("PDCLUSTER_MODEL", raising=False)


def _yaml(tmp_path, text: str | bytes, name: str = "c.yaml") -> str:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


# -- loading ---------------------------------------------------------------------------------
def test_defaults_load_and_are_frozen():
    cfg = load_config()
    assert cfg == ClusterConfig().check()
    assert cfg.model.path is None and cfg.model.dtype == "bfloat16" and cfg.model.max_model_len is None
    assert cfg.prefill == PoolConfig() and cfg.decode == PoolConfig()
    assert cfg.prefill.plan == "tp1-pp1"
    assert cfg.transfer.backend == "auto" and cfg.transfer.checksum is False and cfg.transfer.compress is None
    assert cfg.router.host == "127.0.0.1" and cfg.ray.host == "127.0.0.1" and cfg.ray.address is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.router.port = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.prefill = PoolConfig()


@pytest.mark.parametrize("name", ["autoscale", "bench-colocated-chunked", "bench-colocated",
                                  "bench-disagg-nostream", "bench-disagg"])
def test_every_cluster_yaml_in_deploy_loads(name):
    cfg = load_config(str(REPO / "deploy" / f"{name}.yaml"))
    assert cfg.router.host == "127.0.0.1" and cfg.ray.host == "127.0.0.1"


def test_the_autoscaling_example_builds_its_policy():
    from router.planner.profile import resolve_profile
    from router.autoscale import make_policy
    from router.planner.profile import load_profile
    from router.autoscale import Observation, PoolObservation
    a = load_config(str(REPO / "deploy" / "autoscale.yaml")).autoscaling
    assert a.policy == "slo" and a.bounds("decode").max_instances == 3
    policy = make_policy(a, load_profile(resolve_profile(a.profile)))
    idle = Observation(now=0.0, window_s=a.window_s, arrivals=0,
                       pools={"prefill": PoolObservation(2), "decode": PoolObservation(2)})
    policy.decide(idle)
    # after its downscale delay, an idle cluster shrinks to each pool's minimum, one step at a time
    later = Observation(now=a.bounds("prefill").downscale_delay_s, window_s=a.window_s, arrivals=0,
                        pools=idle.pools)
    assert policy.decide(later).desired == {"prefill": 1, "decode": 1}


def test_empty_yaml_file_is_the_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "")) == ClusterConfig()
    assert load_config(_yaml(tmp_path, "# only a comment\n")) == ClusterConfig()


def test_deploy_local_yaml_loads():
    cfg = load_config(str(REPO / "deploy" / "local.yaml"))
    assert cfg.prefill.num_instances == 1 and cfg.decode.num_instances == 1
    assert cfg.transfer.backend == "auto" and cfg.transfer.checksum is False
    assert cfg.transfer.lease_ttl_s == 30.0 and isinstance(cfg.transfer.lease_ttl_s, float)
    assert cfg.router.request_timeout_s == 300.0 and isinstance(cfg.router.request_timeout_s, float)
    assert cfg.router.host == "127.0.0.1" and cfg.ray.host == "127.0.0.1"
    # the file says its values are the defaults
    assert cfg == ClusterConfig()


def test_values_from_yaml_and_overrides(tmp_path):
    path = _yaml(tmp_path, "prefill:\n  num_instances: 2\n  kv_cache_memory_gb: 1\n"
                           "transfer:\n  backend: zmq\n  compress: int8\n  checksum: true\n"
                           "router:\n  port: 0\n")
    cfg = load_config(path, overrides={"prefill": {"max_num_seqs": 8}, "router": {"port": 6000}})
    assert cfg.prefill.num_instances == 2 and cfg.prefill.max_num_seqs == 8
    assert cfg.prefill.kv_cache_memory_gb == 1.0 and isinstance(cfg.prefill.kv_cache_memory_gb, float)
    assert cfg.prefill.block_size == 16          # untouched keys keep their defaults
    assert cfg.transfer.backend == "zmq" and cfg.transfer.compress == "int8" and cfg.transfer.checksum is True
    assert cfg.router.port == 6000               # the override wins over the file
    assert cfg.decode == PoolConfig()


def test_replace_changes_some_keys_and_checks_them():
    cfg = ClusterConfig()
    new = cfg.replace(router={"port": 0}, decode={"max_num_seqs": 4})
    assert new.router.port == 0 and new.decode.max_num_seqs == 4
    assert new.router.host == cfg.router.host and new.prefill == cfg.prefill
    assert cfg.router.port == 50051              # the original is unchanged
    with pytest.raises(ConfigError, match=r"router\.port"):
        cfg.replace(router={"port": 70000})
    with pytest.raises(ConfigError, match=r"decode\.max_num_sqs"):
        cfg.replace(decode={"max_num_sqs": 4})


def test_model_path_must_exist(tmp_path):
    assert load_config(None, {"model": {"path": str(tmp_path)}}).model.path == str(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.path"):
        load_config(None, {"model": {"path": str(tmp_path / "nope")}})


# -- the environment ---------------------------------------------------------------------------
def test_pdcluster_model_env_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_MODEL", str(tmp_path))
    assert load_config().model.path == str(tmp_path)
    # from a file that leaves model.path out, too
    assert load_config(_yaml(tmp_path, "model:\n  dtype: float32\n")).model.path == str(tmp_path)
    # a path in the file or in the overrides wins over the environment
    other = tmp_path / "other"
    other.mkdir()
    assert load_config(_yaml(tmp_path, f"model:\n  path: {other}\n")).model.path == str(other)
    assert load_config(None, {"model": {"path": str(other)}}).model.path == str(other)
    monkeypatch.setenv("PDCLUSTER_MODEL", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"model\.path"):
        load_config()


def test_pdcluster_model_env_with_a_bad_model_section(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_MODEL", str(tmp_path))
    with pytest.raises(ConfigError, match="model"):
        load_config(_yaml(tmp_path, "model: 3\n"))


def test_pdcluster_model_env_fills_an_empty_model_section(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_MODEL", str(tmp_path))
    assert load_config(_yaml(tmp_path, "model:\n")).model.path == str(tmp_path)


# -- bad keys, types and values ------------------------------------------------------------------
def test_unknown_key_at_top_level(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key prefil\b"):
        load_config(_yaml(tmp_path, "prefil:\n  num_instances: 2\n"))


def test_unknown_nested_key_names_its_dotted_path(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key prefill\.num_instancs") as e:
        load_config(_yaml(tmp_path, "prefill:\n  num_instancs: 2\n"))
    assert "num_instances" in str(e.value)     # the known keys are listed
    with pytest.raises(ConfigError, match=r"transfer\.bakend"):
        load_config(None, {"transfer": {"bakend": "zmq"}})


@pytest.mark.parametrize("section,key,value", [
    ("prefill", "num_instances", "'2'"),         # a string for an int
    ("prefill", "num_instances", "true"),        # a bool for an int
    ("decode", "block_size", "16.5"),            # a float for an int
    ("decode", "kv_cache_memory_gb", "'1'"),     # a string for a float
    ("decode", "kv_cache_memory_gb", "false"),   # a bool for a float
    ("transfer", "checksum", "1"),               # an int for a bool
    ("transfer", "checksum", "'yes'"),           # a string for a bool
    ("transfer", "backend", "3"),                # an int for a string
    ("router", "port", "[1, 2]"),                # a list for an int
    ("model", "max_model_len", "'4096'"),        # a string for an optional int
    ("ray", "num_cpus", "2.0"),                  # a float for an optional int
])
def test_wrong_type_names_the_key(tmp_path, section, key, value):
    path = _yaml(tmp_path, f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"{section}\.{key} must be"):
        load_config(path)


@pytest.mark.parametrize("section,key,value", [
    ("prefill", "num_instances", 0),
    ("decode", "num_threads", -1),
    ("prefill", "block_size", 0),
    ("decode", "max_num_seqs", 0),
    ("prefill", "max_num_batched_tokens", 0),
    ("prefill", "kv_cache_memory_gb", 0),
    ("decode", "kv_cache_memory_gb", -0.5),
    ("decode", "num_gpus", -1),
    ("prefill", "tp_size", 0),
    ("transfer", "lease_ttl_s", 0),
    ("router", "port", 65536),
    ("router", "port", -1),
    ("router", "max_active_requests", 0),
    ("router", "request_timeout_s", 0),
    ("router", "drain_timeout_s", -1),
    ("model", "max_model_len", 0),
    ("ray", "num_cpus", 0),
])
def test_out_of_range_value_names_the_key(section, key, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        load_config(None, {section: {key: value}})


def test_multi_rank_plans_run_in_prefill_and_decode_pools():
    cfg = load_config(None, {"prefill": {"tp_size": 2}, "decode": {"pp_size": 2}})
    assert (cfg.prefill.plan, cfg.decode.plan) == ("tp2-pp1", "tp1-pp2")
    with pytest.raises(ConfigError, match=r"colocated\.tp_size"):
        load_config(None, {"mode": "colocated", "colocated": {"tp_size": 2}})
    with pytest.raises(ConfigError, match=r"transfer\.stream_layers"):
        load_config(None, {"prefill": {"pp_size": 2}, "transfer": {"backend": "zmq", "stream_layers": True}})


@pytest.mark.parametrize("section,key,value", [
    ("transfer", "lease_ttl_s", ".nan"),
    ("prefill", "kv_cache_memory_gb", ".nan"),
    ("prefill", "kv_cache_memory_gb", ".inf"),
    ("router", "request_timeout_s", ".nan"),
])
def test_non_finite_floats_are_rejected(tmp_path, section, key, value):
    path = _yaml(tmp_path, f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        load_config(path)


def test_bad_backend_dtype_and_compression_names(tmp_path):
    with pytest.raises(ConfigError, match=r"transfer\.backend must be one of") as e:
        load_config(_yaml(tmp_path, "transfer:\n  backend: carrier-pigeon\n"))
    assert "carrier-pigeon" in str(e.value)
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        load_config(None, {"model": {"dtype": "int4"}})
    with pytest.raises(ConfigError, match=r"transfer\.compress"):
        load_config(None, {"transfer": {"compress": "zstd"}})


def test_every_backend_the_config_accepts_has_a_data_path():
    from kv_transfer.data_paths import make_data_path
    for backend in kv_transfer.BACKENDS:
        cfg = load_config(None, {"transfer": {"backend": backend}})
        if backend == "ray":   # needs a connected Ray; it says so, rather than "unknown backend"
            with pytest.raises(kv_transfer.TransferError, match="connected to a Ray cluster"):
                make_data_path(cfg.transfer.backend, "pdkv-test-config")
            continue
        make_data_path(cfg.transfer.backend, "pdkv-test-config").close()
    with pytest.raises(ValueError, match="no data path for backend 'pigeon'"):
        make_data_path("pigeon", "pdkv-test-config")


def test_a_section_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"router must be a mapping"):
        load_config(_yaml(tmp_path, "router: 5\n"))
    with pytest.raises(ConfigError, match=r"prefill must be a mapping"):
        load_config(None, {"prefill": [1, 2]})


def test_null_for_a_required_value_names_the_key():
    with pytest.raises(ConfigError, match=r"router\.port must not be empty"):
        load_config(None, {"router": {"port": None}})
    assert load_config(None, {"model": {"max_model_len": None}}).model.max_model_len is None


# -- bad files ---------------------------------------------------------------------------------------
def test_bad_yaml_text_names_the_file(tmp_path):
    path = _yaml(tmp_path, "prefill:\n  num_instances: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(path)
    assert path in str(e.value)


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_non_mapping_yaml_names_the_file(tmp_path, text, kind):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="must be a mapping") as e:
        load_config(path)
    assert path in str(e.value) and kind in str(e.value)


def test_missing_file_and_a_directory_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read config") as e:
        load_config(missing)
    assert missing in str(e.value)
    with pytest.raises(ConfigError, match="cannot read config") as e:
        load_config(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_a_file_that_is_not_utf8_names_the_file(tmp_path):
    path = _yaml(tmp_path, b"router:\n  host: \xff\xfe\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert path in str(e.value)


def test_the_error_type_is_a_value_error_of_the_engine():
    # callers (the CLI) catch ConfigError; it is the engine's, and a ValueError
    from engine.errors import ConfigError as EngineConfigError, EngineError
    assert C.ConfigError is EngineConfigError
    assert issubclass(ConfigError, EngineError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("transfer,ok", [
    ({"backend": "zmq", "stream_layers": True}, True),
    ({"backend": "zmq", "stream_layers": True, "compress": "int8", "checksum": True}, True),
    ({"backend": "shm", "stream_layers": True}, True),                     # zero copy
    ({"backend": "shm", "stream_layers": True, "checksum": True}, False),   # staged: no layers
    ({"backend": "torch_dist", "stream_layers": True}, False),
    ({"backend": "ray", "stream_layers": True}, False),
    ({"backend": "zmq", "stream_layers": "yes"}, False),
])
def test_stream_layers_needs_a_backend_that_streams(transfer, ok):
    if ok:
        assert load_config(None, {"transfer": transfer}).transfer.stream_layers is True
    else:
        with pytest.raises(ConfigError, match=r"transfer\.stream_layers"):
            load_config(None, {"transfer": transfer})


@pytest.mark.parametrize("sections,key", [
    ({"router": {"disaggregation": "conditional"}, "conditional": {"profile": "no-such-profile"}},
     "conditional.profile"),
    ({"autoscaling": {"policy": "slo", "profile": "/nowhere/profile.json", "ttft_p90_s": 1.0}},
     "autoscaling.profile"),
])
def test_a_latency_profile_that_does_not_exist_is_a_config_error_naming_its_key(sections, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, sections)


@pytest.mark.parametrize("value,ok", [(0, True), (0.5, True), (1, True), (-0.1, False), (1.5, False),
                                      ("half", False), (True, False)])
def test_conditional_remote_fits_is_a_share_of_the_ttft_slo(value, ok):
    sections = {"router": {"disaggregation": "conditional"}, "conditional": {"remote_fits": value}}
    if ok:
        assert load_config(None, sections).conditional.remote_fits == value
    else:
        with pytest.raises(ConfigError, match=r"conditional\.remote_fits"):
            load_config(None, sections)
