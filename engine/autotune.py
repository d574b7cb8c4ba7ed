"""Choices between equivalent code paths, made by a measurement on this machine and cached.

Which matmul or attention path is fastest depends on the processor (DESIGN.md, "On
this hardware": on the EPYC one GEMM path wins, on the AMX Xeon the other), and the
development VM's processor changes from day to day. So a choice is never a constant:
the first process to need it measures the candidates side by side, and the winner is
kept in `$PDCLUSTER_CACHE_DIR/tuning/` (default ~/.cache/pdcluster/tuning) under a key
that names the processor, its flags, torch's version and what was measured. A later
start on the same machine reads it back (no measurement); another machine measures anew.

PDCLUSTER_AUTOTUNE=0 skips measuring: every choice takes its first candidate (the
plain, always-correct one), as a test that wants one path does.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("PDCLUSTER_AUTOTUNE", "1") != "0"


def _cache_dir() -> Path:
    env = os.environ.get("PDCLUSTER_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "pdcluster") / "tuning"


def machine_fingerprint() -> str:
    """The processor (model name and flags), its cores' caches, torch's version: what a choice depends on."""
    lines = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "cache size")):
                lines.append(line)
                if len(lines) == 3:
                    break
    except OSError:
        lines.append(platform.processor())
    lines += [platform.machine(), torch.__version__]
    return "\n".join(lines)


def source_hash(*paths: str) -> str:
    """A short hash of source files: a choice between kernels is remeasured when their code changes."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:12]


def cache_path(what: str, detail: str) -> Path:
    key = hashlib.sha256(f"{machine_fingerprint()}\n{what}\n{detail}".encode()).hexdigest()[:16]
    return _cache_dir() / f"{what}-{key}.json"


def cached_choice(what: str, detail: str, measure: Callable[[], dict]) -> dict:
    """The stored result of `measure()` for (`what`, `detail`) on this machine, measured now if there is none.

    `measure` returns a JSON-able dict (the choice and the timings behind it)."""
    path = cache_path(what, detail)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    # Processes that start together (a cluster's workers) measure one at a time: measuring at
    # once would time each other's load. The first one stores the choice, the others read it.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError as e:
        log.warning("tuning cache %s unusable (%s): measuring without storing", path.parent, e)
        return measure()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        return _measure_and_store(path, measure)


def _measure_and_store(path: Path, measure: Callable[[], dict]) -> dict:
    result = measure()
    result["measured_on"] = machine_fingerprint().splitlines()[0]
    try:
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)   # renamed: readers never see half
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not store the tuning choice in %s: %s", path, e)
    return result


def time_interleaved(candidates: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """Median seconds per call of each candidate, the candidates taking turns each round.

    On one thread this is the thread's CPU time, not wall time: a shared machine's other
    load then slows a candidate less (the caches and memory bus it shares are still seen).
    With more threads, wall time (their work is spread over threads)."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for fn in candidates.values():
        fn()   # warm-up: first-call set-up, oneDNN primitive creation
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}
