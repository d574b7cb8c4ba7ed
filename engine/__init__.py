"""The engine both worker kinds run: a Llama-family model over a paged KV cache.

In-process API: `from engine import LLM, SamplingParams`.

The names are resolved lazily so that the plain-data modules (errors,
sampling_params, output, block_manager, scheduler) can be imported by the
router without importing torch.
"""
from importlib import import_module

_EXPORTS = {
    "LLM": "engine.llm",
    "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.output",
    "default_model_path": "engine.default_model",
    "EngineError": "engine.errors",
    "InvalidRequestError": "engine.errors",
    "ConfigError": "engine.errors",
    "ModelLoadError": "engine.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
