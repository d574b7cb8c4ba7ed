"""A worker busy in steps longer than the heartbeat interval is not taken for dead."""
from __future__ import annotations

import pytest

from cluster.client import Client
from cluster.local import Cluster
from tests.integration.conftest import cluster_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_busy_instance_is_not_taken_for_dead():
    """Every step of the decode worker takes 2.5 s (longer than the heartbeat interval)."""
    cfg = cluster_config(faults={"step_delay_s": 2.5}, router={"request_timeout_s": 60})
    with Cluster(cfg, log=lambda *_: None) as c:
        with Client(c.address, timeout_s=120) as client:
            r = client.complete("List three colours:", max_tokens=3, temperature=0.0, ignore_eos=True)
            state = client.state()
        assert len(r.token_ids) == 3 and r.finish_reason == "length"
        assert not c.pools.deaths and c.router.core.num_migrations == 0
        assert all(i.alive and i.status == "serving" for i in state.instances)
