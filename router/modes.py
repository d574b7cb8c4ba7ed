"""The serving modes, named once (plain strings: they travel through YAML, JSON and plan files).

    disaggregated      a prefill pool and a decode pool, KV moved between them
    colocated          one pool whose instances run both phases, whole prefills first (vLLM's default)
    colocated_chunked  the same, prefill chunks riding on decode steps (Sarathi-Serve)
"""
DISAGGREGATED = "disaggregated"
COLOCATED = "colocated"
COLOCATED_CHUNKED = "colocated_chunked"
MODES = (DISAGGREGATED, COLOCATED, COLOCATED_CHUNKED)


def is_colocated(mode: str) -> bool:
    """One pool runs both phases (the baselines)."""
    return mode in (COLOCATED, COLOCATED_CHUNKED)
