"""The transfer backends and the pull failure policies, named once (torch-free, so the config can check a name cheaply).

    auto        per prefill/decode pair: shm zero copy when both sit on one node, zmq across nodes
    zmq         bytes in zmq frames over TCP (crosses nodes)
    shm         a POSIX shared-memory segment, or zero copy out of the sender's cache (one node)
    torch_dist  gloo / NCCL point-to-point in a per-pair process group
    ray         Ray's object store (both processes connected to one Ray cluster)
"""
import os
import socket

BACKENDS = ("auto", "shm", "zmq", "torch_dist", "ray")
ONE_NODE = ("shm",)   # a pair on two nodes cannot use these: a start-up error, never a silent recompute

# what a decode instance does when a KV pull fails (its prefill instance died, the data stayed bad):
# prefill the request again itself, have the router prefill it again elsewhere, or fail it
ON_FAILURE = ("recompute", "reprefill", "fail")


def this_machine() -> str:
    """A name for the machine whose /dev/shm this process sees, where no Ray node id is given
    (tests, benchmarks): the host name and this boot's id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = str(os.getpid())
    return f"{socket.gethostname()}-{boot}"
