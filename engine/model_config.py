"""What the engine needs to know about a model, read from its config.json."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from engine.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, object], ...]   # frozen items of rope_parameters
    max_position_embeddings: int
    qkv_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: frozenset[int]

    @property
    def rope_params(self) -> dict:
        return dict(self.rope_scaling)

    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size


def load_model_config(path: str) -> ModelConfig:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ModelLoadError(f"no config.json in model directory {path!r}")
    with open(cfg_file) as f:
        raw = json.load(f)
    archs = raw.get("architectures") or [_BY_MODEL_TYPE.get(raw.get("model_type"), "")]
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(
            f"{path!r}: architectures {archs} not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    try:
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        return ModelConfig(
            path=path,
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(path, raw),
        )
    except KeyError as e:
        raise ModelLoadError(f"{cfg_file}: missing key {e.args[0]!r}") from None


def _eos_ids(path: str, raw: dict) -> frozenset[int]:
    """EOS ids from config.json and generation_config.json (either may hold a list)."""
    ids: set[int] = set()
    sources = [raw]
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):
        with open(gen_file) as f:
            sources.append(json.load(f))
    for src in sources:
        eos = src.get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    return frozenset(ids)
