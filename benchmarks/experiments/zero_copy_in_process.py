"""One process, both sides: where the time of a 16 MB zero-copy shm transfer goes.

    .venv/bin/python benchmarks/experiments/zero_copy_in_process.py
"""
import time, torch
torch.set_num_threads(1)
from engine.cpu_tuning import keep_freed_memory; keep_freed_memory()
from kv_transfer.layout import KVLayout
from kv_transfer.channel import ChannelSender
from kv_transfer.channel_receiver import ChannelReceiver
from kv_transfer.shared_cache import SharedKVCache, copy_block_runs
lay = KVLayout(num_layers=30, layer_start=0, layer_end=30, num_kv_heads=3, head_start=0, head_end=3, head_dim=64, block_size=16, dtype="bfloat16")
n = 16 * 2**20 // lay.bytes_per_token; nb = -(-n // 16)
sh = SharedKVCache(lay.cache_shape(nb + 4), torch.bfloat16); sh.tensor.copy_(torch.randn(sh.shape))
dst = torch.zeros(lay.cache_shape(nb + 4), dtype=torch.bfloat16)
s = ChannelSender(sh.tensor, lay, "shm", checksum=False, shared_cache=sh)
r = ChannelReceiver(dst, lay, "shm")
ids = list(range(nb))
ts = []
for i in range(8):
    off = s.offer(f"r{i}", ids, n, time.monotonic())
    t = time.perf_counter(); r.pull(off, ids)
    res = []
    while not res:
        s.poll(time.monotonic()); res = r.poll()
    ts.append(time.perf_counter() - t)
    while s.leases.live(): s.poll(time.monotonic())
print("in-process transfer ms", ["%.2f" % (x*1e3) for x in ts])
src = sh.tensor
t=time.perf_counter()
for _ in range(5): copy_block_runs(src, ids, dst, ids)
print("copy_block_runs ms %.2f" % ((time.perf_counter()-t)/5*1e3), "bytes MB", n*lay.bytes_per_token/2**20)
import cProfile, pstats
pr = cProfile.Profile(); pr.enable()
for i in range(5):
    off = s.offer(f"p{i}", ids, n, time.monotonic()); r.pull(off, ids); res=[]
    while not res:
        s.poll(time.monotonic()); res = r.poll()
    while s.leases.live(): s.poll(time.monotonic())
pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(8)
r.close(); s.close(); src=None; sh.close()
