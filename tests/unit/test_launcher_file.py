"""deploy/ray-cluster.yaml is a launcher file Ray accepts, and the test hosts start Ray with its commands."""
from __future__ import annotations

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.bench.hosts import LAUNCHER, REPO, launcher_commands, node_command


def test_ray_validates_the_launcher_file_as_ray_up_does():
    raw = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))   # what `ray up` runs before it starts anything
    broken = copy.deepcopy(raw)
    broken["provider"]["worker_ip"] = broken["provider"].pop("worker_ips")   # a typo: Ray must refuse it
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_the_launcher_brings_the_project_and_starts_ray_from_its_venv():
    raw = yaml.safe_load(LAUNCHER.read_text())
    assert raw["file_mounts"]["~/pdcluster"] == "."           # this checkout, to every node
    assert "~/.ray/auth_token" in raw["file_mounts"]          # the cluster's token too
    assert any("make install" in c for c in raw["setup_commands"])
    starts = launcher_commands()
    for role, line in starts.items():
        assert "~/pdcluster/.venv/bin/ray start" in line and "RAY_AUTH_MODE=token" in line
        assert "--node-ip-address=$(hostname -I" in line      # bound to the node's own address
        assert "host_$(hostname -s)" in line and "--labels=" in line
        assert "PYTHONPATH=~/pdcluster" in line
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in starts["head"]
    assert "--address=$RAY_HEAD_IP:6379" in starts["worker"]


def test_the_test_hosts_run_those_commands_with_this_checkout():
    starts = launcher_commands()
    head = node_command(starts["head"], "10.251.0.1", "/tmp/pdmn/a", 0, 96 << 20, head=True)
    worker = node_command(starts["worker"], "10.251.0.1", "/tmp/pdmn/b", 4, 96 << 20, head=False)
    assert "--autoscaling-config" not in head and f"PYTHONPATH={REPO} " in head
    assert "--address=10.251.0.1:6379" in worker and "--temp-dir=/tmp/pdmn/b" in worker
    assert "/.venv/bin/ray start" in worker or "/bin/ray start" in worker
    assert "~" not in head + worker and "--block" in worker
