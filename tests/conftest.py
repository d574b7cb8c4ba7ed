"""Test-wide setup.

TRITON_INTERPRET must be set before any Triton kernel is decorated, so it is
set here, before any project module is imported: the Triton kernels then run on
CPU tensors in the interpreter and are compared with their torch references.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
