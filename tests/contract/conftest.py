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

# Token auth for the Ray head below, set before anything here imports ray: Ray reads these when
# it is imported, and a test may import it early (to check that backend `ray` needs a connection).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

OBJECT_STORE_BYTES = 256 * 2**20


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head bound to 127.0.0.1 (token auth), this process connected as its driver;
    sender children join it at its address. Shut down when the module's tests are done."""
    # ray.init(_node_ip_address="127.0.0.1") alone is not enough: Ray swaps a loopback
    # address for the machine's external one unless it thinks clusters are off. Restored
    # afterwards, so that later tests in the session see Ray as they would alone.
    saved_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
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
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env


@pytest.fixture(autouse=True)
def _ray_for_ray_backend(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "ray":
        request.getfixturevalue("ray_cluster")


@pytest.fixture(scope="module", autouse=True)
def _stop_sender_children():
    """Sender children are kept between a module's tests, not beyond them."""
    yield
    from tests.contract.harness import stop_children
    stop_children()
