"""Regenerate the checked-in stubs: `python -m protos.generate` from the repository root.

tests/unit/test_protos.py regenerates into a temporary folder and fails when
the checked-in files differ from what the .proto files give.
"""
from __future__ import annotations

import os
import sys

PROTOS = ("protos/pdcluster.proto", "protos/worker.proto")
WITH_SERVICES = ("protos/pdcluster.proto",)


def generate(out_dir: str, root: str) -> None:
    from grpc_tools import protoc
    import grpc_tools
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for proto in PROTOS:
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
        if proto in WITH_SERVICES:
            args.append(f"--grpc_python_out={out_dir}")
        if protoc.main(args + [os.path.join(root, proto)]) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    generate(root, root)
    sys.exit(0)
