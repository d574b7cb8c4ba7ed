"""The engine both worker kinds run: a Llama-family model over a paged KV cache.

In-process API: `from engine import LLM, SamplingParams`.
"""
from engine.default_model import default_model_path
from engine.errors import ConfigError, EngineError, InvalidRequestError, ModelLoadError
from engine.llm import LLM
from engine.output import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "default_model_path",
           "EngineError", "InvalidRequestError", "ConfigError", "ModelLoadError"]
