"""`pdcluster serve`, `generate` and `status`: the cluster from the command line."""
from __future__ import annotations

import signal
import sys
import threading

import yaml

from cluster.client import Client
from cluster.config import load_config, merge_sections
from engine.errors import ConfigError


def plan_fragment(path: str) -> dict:
    """A plan YAML (`pdcluster plan`): config sections to merge over the base config."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read plan {path!r}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"plan {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"plan {path!r} must be a mapping of config sections, got {type(data).__name__}")
    return data


def serve(config_path: str | None, address: str | None, port: int | None, plan_path: str | None = None,
          http_port: int | None = None) -> int:
    """Start the cluster in the foreground; Ctrl-C (or SIGTERM) drains it and stops."""
    from cluster.local import Cluster   # here: it brings torch and Ray, which `generate` / `status` do not need
    overrides: dict = plan_fragment(plan_path) if plan_path else {}
    if address:
        overrides = merge_sections(overrides, {"ray": {"address": address}})
    if port is not None:
        overrides = merge_sections(overrides, {"router": {"port": port}})
    if http_port is not None:   # -1: no HTTP API
        overrides = merge_sections(overrides, {"router": {"http_port": None if http_port < 0 else http_port}})
    cfg = load_config(config_path, overrides)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = Cluster(cfg)
    try:
        cluster.start()
        http = cluster.router.http_port_bound
        scheme = "https" if cfg.router.tls else "http"
        host = cluster.config.router.host   # router.host auto: this node's address, resolved at start
        also = f", OpenAI-compatible HTTP on {scheme}://{host}:{http}/v1" if http is not None else ""
        print(f"serving on {cluster.address} (gRPC){also}; Ctrl-C drains and stops", flush=True)
        while not stop.wait(0.5):
            pass
        print(f"draining (up to {cfg.router.drain_timeout_s:.0f}s) ...", flush=True)
    finally:
        cluster.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("stopped", flush=True)
    return 0


def stream_answer(client, **request):
    """Stream one completion's text to stdout as it comes; return the final result."""
    for chunk in client.generate(**request):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    return client.last


def describe(r) -> str:
    """One line of a result's size and phase timings."""
    m = r.metrics
    return (f"[{len(r.token_ids)} tokens, {r.finish_reason}] TTFT {m['ttft_s'] * 1e3:.0f} ms, "
            f"TPOT {m['mean_tpot_s'] * 1e3:.1f} ms | queue {m['queue_s'] * 1e3:.1f} ms, "
            f"prefill {m['prefill_s'] * 1e3:.0f} ms on {r.prefill_instance}, "
            f"KV transfer {m['transfer_s'] * 1e3:.1f} ms, decode {m['decode_s'] * 1e3:.0f} ms "
            f"on {r.decode_instance or '-'}")


def generate(address: str, prompt: str, raw: bool, security: dict | None = None, **sampling) -> int:
    """Stream one completion to the terminal, then its timings on stderr. `security`: Client's
    tls / ca_cert / client_cert / client_key / token."""
    with Client(address, **(security or {})) as client:
        kwargs = {"prompt": prompt} if raw else {"messages": [{"role": "user", "content": prompt}]}
        result = stream_answer(client, **kwargs, **sampling)
    print(f"\n{describe(result)}", file=sys.stderr)
    return 0


def status(address: str, security: dict | None = None) -> int:
    with Client(address, **(security or {})) as client:
        state = client.state()
    print(f"model {state.model}  transfer {state.transfer_backend}  "
          f"requests {state.num_active_requests}/{state.max_active_requests}")
    print(f"{'instance':<12}{'role':<11}{'plan':<9}{'alive':<7}{'waiting':>8}{'running':>8}"
          f"{'queued tok':>11}{'free blocks':>14}{'leases':>8}{'steps':>9}{'step ms':>9}")
    for i in state.instances:
        print(f"{i.name:<12}{i.role:<11}{i.plan:<9}{'yes' if i.alive else 'NO':<7}{i.num_waiting:>8}"
              f"{i.num_running:>8}{i.queued_prompt_tokens:>11}{f'{i.num_free_blocks}/{i.num_blocks}':>14}"
              f"{i.num_leases:>8}{i.num_steps:>9}{i.mean_step_s * 1e3:>9.1f}")
    return 0
