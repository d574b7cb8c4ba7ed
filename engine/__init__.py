"""The engine both worker kinds run: a Llama-family model over a paged KV cache.

In-process API: `from engine import LLM, SamplingParams`.

The names are resolved lazily so that the plain-data modules (errors,
sampling_params, output, block_manager, scheduler) can be imported by the
router without importing torch.
"""
from engine.lazy_exports import lazy_exports

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


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
