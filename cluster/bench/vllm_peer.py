"""The vLLM side of `pdcluster bench engine --peer vllm`: a script run by the peer's own Python.

It runs in vLLM's CPU venv (../shared/peers/setup-vllm-cpu.sh), so it imports nothing
of ours, only the standard library and vLLM. The parent (cluster/bench/engine_peer.py)
starts it once, then sends one JSON request per line on stdin:

    {"prompts": [[token ids], ...], "max_tokens": N}    -> {"seconds": s, "cpu_seconds": c, "token_ids": [[...], ...]}
    {"quit": true}                                      -> exits

Each request is timed here (wall and this process's CPU time), around `LLM.generate`
alone, so that the pipe and JSON cost of the exchange stay out of the peer's figure as
they stay out of ours. Replies
go on a private copy of stdout: vLLM logs to stdout, and that is sent to stderr.
"""
from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype=spec["dtype"], enable_prefix_caching=False,
              max_model_len=spec["max_model_len"], max_num_seqs=spec["max_num_seqs"], seed=0)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
        params = SamplingParams(max_tokens=request["max_tokens"], temperature=0.0, ignore_eos=True)
        start, cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        token_ids = [list(o.outputs[0].token_ids) for o in outs]
        replies.write(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "token_ids": token_ids}) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":   # vLLM starts worker processes that re-import the main module
    sys.exit(main())
