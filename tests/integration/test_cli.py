"""`pdcluster serve` in the foreground, `generate` and `status` against it, Ctrl-C drains and stops."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_serve_generate_status_and_ctrl_c(tmp_path):
    port = _free_port()
    config = tmp_path / "c.yaml"
    config.write_text("prefill: {kv_cache_memory_gb: 0.1}\ndecode: {kv_cache_memory_gb: 0.1}\n"
                      "router: {drain_timeout_s: 5}\n")
    log = open(tmp_path / "serve.log", "w+")
    serve = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(config),
                              "--port", str(port), "--http-port", "0"], stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 180
        while "serving on" not in (tmp_path / "serve.log").read_text():
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.5)
        address = f"127.0.0.1:{port}"
        gen = _cli("generate", "--address", address, "--max-tokens", "8", "What is the capital of France?")
        assert gen.returncode == 0, gen.stderr[-2000:]
        assert "Paris" in gen.stdout and "TTFT" in gen.stderr and "on decode-0" in gen.stderr
        status = _cli("status", "--address", address)
        assert status.returncode == 0, status.stderr[-2000:]
        assert "prefill-0" in status.stdout and "decode-0" in status.stdout and "NO" not in status.stdout
        bad = _cli("generate", "--address", address, "--max-tokens", "0", "hi")
        assert bad.returncode == 2 and "max_tokens must be > 0" in bad.stderr and "Traceback" not in bad.stderr
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=120) == 0
        out = (tmp_path / "serve.log").read_text()
        assert "draining" in out and "stopped" in out
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(30)
        log.close()
    gone = _cli("status", "--address", f"127.0.0.1:{port}", timeout=60)
    assert gone.returncode == 2 and "UNAVAILABLE" in gone.stderr
