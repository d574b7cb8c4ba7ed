"""A cluster driver on test host A: `Cluster` joined to the test hosts' Ray, driven by JSON lines.

    {"op": "start", "config": {...}}       -> address, infos, rank infos, keys, reply endpoint
    {"op": "complete", "prompts": [...], "max_tokens": n, "concurrent": false}   -> completions (greedy)
    {"op": "stats"}                        -> every worker's stats
    {"op": "deaths"}                       -> the instances the pool manager saw die
    {"op": "stop"}                         -> the cluster stopped (Ray stays: it is the hosts')

One reply line per request on stdout ({"ok": true, ...} or {"ok": false, "error": ...});
everything else this process prints goes to stderr. Run by tests/multinode/conftest.py
inside host A (`ip netns exec`), with the cluster's Ray token in its environment.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # Ray, the cluster's log and any print go to stderr: stdout is for replies only
    from cluster.client import Client
    from cluster.config import load_config
    from cluster.local import Cluster

    state: dict = {}

    def start(config: dict) -> dict:
        cluster = Cluster(load_config(None, config), log=lambda *a: print(*a, file=sys.stderr, flush=True))
        state["cluster"] = cluster.start()
        state["client"] = Client(cluster.address, timeout_s=120)
        keys = cluster.pools.keys
        return {"address": cluster.address, "infos": cluster.infos, "rank_infos": cluster.rank_infos,
                "reply_endpoint": cluster.reply_endpoint,
                "keys": dataclasses.asdict(keys) if keys is not None else None}

    def complete(prompts: list[str], max_tokens: int, concurrent: bool = False) -> dict:
        def one(p: str) -> dict:
            r = state["client"].complete(p, max_tokens=max_tokens, temperature=0.0)
            return {"token_ids": list(r.token_ids), "text": r.text, "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens, "prefill_instance": r.prefill_instance,
                    "decode_instance": r.decode_instance}
        if not concurrent:
            return {"completions": [one(p) for p in prompts]}
        with ThreadPoolExecutor(len(prompts)) as pool:
            return {"completions": list(pool.map(one, prompts))}

    def stop() -> dict:
        client, cluster = state.pop("client", None), state.pop("cluster", None)
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.stop()
        return {}

    def deaths() -> dict:
        return {"deaths": [{"name": d.name, "reason": d.reason, "replaced_by": d.replaced_by}
                           for d in state["cluster"].pools.deaths]}

    ops = {"start": start, "complete": complete, "stats": lambda: {"stats": state["cluster"].worker_stats()},
           "deaths": deaths, "stop": stop}
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            reply = {"ok": True, **ops[op](**req)}
        except Exception as e:
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    stop()


if __name__ == "__main__":
    main()
