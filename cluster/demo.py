"""`make demo` / `pdcluster demo`: answers to a few prompts with per-request timings.

Until the cluster exists this runs the in-process engine on the default model;
the prompts go through the model's chat template and are batched together.
"""
from __future__ import annotations

import time

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Write a haiku about autumn.",
    "Explain in one sentence what a GPU is.",
]


def main(max_tokens: int = 48) -> int:
    from engine import LLM, SamplingParams

    start = time.monotonic()
    llm = LLM()
    print(f"loaded {llm.model_config.path} in {time.monotonic() - start:.1f}s "
          f"({llm.block_manager.num_blocks} KV blocks of {llm.block_manager.block_size} tokens)\n")
    prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in DEMO_PROMPTS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    for question, out in zip(DEMO_PROMPTS, outs):
        m = out.metrics
        print(f"> {question}\n{out.text.strip()}")
        print(f"  [{len(out.token_ids)} tokens, {out.finish_reason}; TTFT {m['ttft_s'] * 1e3:.0f} ms, "
              f"TPOT {m['tpot_s'] * 1e3:.1f} ms]\n")
    return 0
