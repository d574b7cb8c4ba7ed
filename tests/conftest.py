"""Test-wide setup.

TRITON_INTERPRET must be set before any Triton kernel is decorated, so it is
set here, before any project module is imported: the Triton kernels then run on
CPU tensors in the interpreter and are compared with their torch references.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray reads its auth settings when it is first imported, and a unit test may import it before
# an integration test starts a cluster: the settings cluster.ray_cluster.start_ray would set,
# set once for the whole session, so the order tests run in does not matter.
os.environ.setdefault("RAY_AUTH_MODE", "token")
if "RAY_AUTH_TOKEN" not in os.environ:
    import secrets
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

import pytest  # noqa: E402  (after the environment above)

from engine import LLM  # noqa: E402


@pytest.fixture(scope="session")
def llm():
    """The in-process engine on the same weights in fp32: the oracle for cluster output."""
    return LLM(dtype="float32", kv_cache_memory_gb=0.1)
