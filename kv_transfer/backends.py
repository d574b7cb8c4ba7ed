"""The transfer backends and the pull failure policies, named once (torch-free, so the config can check a name cheaply).

    zmq         bytes in zmq frames over TCP (crosses nodes)
    shm         a POSIX shared-memory segment, or zero copy out of the sender's cache (one node)
    torch_dist  gloo / NCCL point-to-point in a per-pair process group
    ray         Ray's object store (both processes connected to one Ray cluster)
"""
BACKENDS = ("shm", "zmq", "torch_dist", "ray")

# what a decode instance does when a KV pull fails (its prefill instance died, the data stayed bad):
# prefill the request again itself, have the router prefill it again elsewhere, or fail it
ON_FAILURE = ("recompute", "reprefill", "fail")
