"""Before/after figures for a transfer change: run the bench's per-backend loop from a tree.

    git archive <old-commit> | tar -x -C /tmp/old
    (cd /tmp/old && PYTHONPATH=/tmp/old /work/main/.venv/bin/python /work/main/benchmarks/transfer_before_after.py shm,zmq before)
    .venv/bin/python benchmarks/transfer_before_after.py shm,zmq after

Prints one JSON line: GB/s per variant and size (1, 16, 128 MB), and the memcpy of the same
run. Alternate the two a few times: the machines are shared and noisy.
"""
import json
import sys

import torch

from cluster.bench import transfer as t
from engine.cpu_tuning import keep_freed_memory

if __name__ == "__main__":
    torch.set_num_threads(1)
    keep_freed_memory()
    labels, tag = sys.argv[1].split(","), sys.argv[2]
    sizes = (1, 16, 128)
    out = {"memcpy": {mb: round(t._memcpy_gbps(mb * 2**20, 5), 2) for mb in sizes}}
    for label, backend, checksum, shared in t.VARIANTS:
        if label in labels:
            rows = t._bench_backend(backend, sizes, 5, checksum, shared)
            out[label] = {mb: round(r["gbps"], 2) for mb, r in rows.items()}
    print(tag, json.dumps(out))
