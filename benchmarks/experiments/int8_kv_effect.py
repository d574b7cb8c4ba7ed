"""Effect of int8 KV compression (kv_transfer.codec) on the default model's greedy output.

After prefill, every prompt's KV goes through int8 and back in place, as the
wire would carry it with `compress: int8`; decoding then continues, and the
tokens are compared with an uncompressed run of the same batch.

    .venv/bin/python benchmarks/experiments/int8_kv_effect.py bfloat16   # or float32
"""
import torch
torch.set_num_threads(2)
from engine import LLM, SamplingParams
from engine.sequence import SeqState
from kv_transfer.layout import KVLayout, pack, unpack_into
from kv_transfer.codec import quantize_int8, dequantize_int8
import itertools
import sys
dtype = sys.argv[1]
llm = LLM(dtype=dtype, kv_cache_memory_gb=0.2)
cfg = llm.model_config
layout = KVLayout(num_layers=cfg.num_layers, layer_start=0, layer_end=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_start=0, head_end=cfg.num_kv_heads, head_dim=cfg.head_dim, block_size=16, dtype=dtype)
prompts = ["The capital of France is", "Write a short poem about the ocean.", "def quicksort(arr):", "Explain why the sky is blue in two sentences.",
           "The history of the printing press begins " * 20, "List three uses of copper:", "Once upon a time", "Q: What is 7 times 8?\nA:"]
N = 32
params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
ref = [o.token_ids for o in llm.generate(prompts, params)]
sch, run = llm.scheduler, llm.runner
seqs = [SeqState(f"q{i}", llm.tokenizer.encode(p), params) for i, p in enumerate(prompts)]
for s in seqs: sch.add(s)
plan = sch.schedule(0); sch.update(plan, run.execute(plan))
errs = []
for s in seqs:   # the prompt's KV through int8 and back, as the wire would carry it
    n = len(s.prompt_token_ids)
    wire = pack(run.kv_cache.data, layout, s.block_ids, n)
    back = dequantize_int8(*quantize_int8(wire), layout.torch_dtype)
    errs.append(((back.float() - wire.float()).norm() / wire.float().norm()).item())
    unpack_into(run.kv_cache.data, layout, s.block_ids, back, layout)
while sch.has_unfinished():
    plan = sch.schedule(0); sch.update(plan, run.execute(plan))
same = [sum(1 for _ in itertools.takewhile(lambda ab: ab[0]==ab[1], zip(s.output_token_ids, r))) for s, r in zip(seqs, ref)]
print(dtype, "KV rel L2 error per prompt: max %.4f" % max(errs), "identical-prefix lengths (of %d):" % N, same, "fully identical:", sum(x == N for x in same), "/", len(same))
