"""The model dtypes, named once (torch-free, so the config can check a name cheaply)."""

DTYPE_NAMES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
