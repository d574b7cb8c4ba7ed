"""The `ray` backend's tests share one local Ray head, started when the first of them runs."""
from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path

import pytest

# The suite imports `tests.contract.harness` from the repository root: `python -m pytest` puts the
# root on sys.path, the `pytest` script does not (pyproject sets no `pythonpath`). Spawned
# sender children inherit this sys.path.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

OBJECT_STORE_BYTES = 256 * 2**20


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head bound to 127.0.0.1 (token auth), this process connected as its driver;
    sender children join it at its address. Shut down when the module's tests are done."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    # ray.init(_node_ip_address="127.0.0.1") alone is not enough: Ray swaps a loopback
    # address for the machine's external one unless it thinks clusters are off.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False   # the same, where ray was imported before the env was set
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=OBJECT_STORE_BYTES, logging_level=logging.WARNING, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    try:
        if not address.startswith("127.0.0.1:"):
            pytest.fail(f"Ray came up on {address}, not on 127.0.0.1")
        yield address
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(autouse=True)
def _ray_for_ray_backend(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "ray":
        request.getfixturevalue("ray_cluster")
