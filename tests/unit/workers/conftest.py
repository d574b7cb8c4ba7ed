"""The in-process worker tests' fixtures: a tiny Llama, the engine on it, and worker pairs."""
from tests.worker_pair import make_pair, oracle, tiny_dir  # noqa: F401
