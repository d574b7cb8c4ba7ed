"""Load a Hugging Face safetensors checkpoint into `CausalLM`, sliced for this rank.

Checkpoint names are mapped onto our fused parameters: q/k/v into qkv_proj,
gate/up into gate_up_proj. Column-parallel weights keep this rank's rows
(heads, MLP columns), row-parallel ones this rank's columns, at the ranges
the layers got from `engine.parallel` (uneven where heads do not divide);
layers outside this pipeline stage are skipped. Every parameter must be filled exactly once.
"""
from __future__ import annotations

import glob
import os
import re

import torch
from safetensors import safe_open

from engine.errors import ModelLoadError
from engine.model import CausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def load_weights(model: CausalLM, path: str) -> None:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {path!r}")
    filled: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                _load_one(model, name, f.get_tensor(name), filled)
    missing = _expected_pieces(model) - filled
    if missing:
        raise ModelLoadError(f"{path!r}: checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")


def _load_one(model: CausalLM, name: str, t: torch.Tensor, filled: set[str]) -> None:
    cfg = model.cfg
    if name == "model.embed_tokens.weight":
        if model.embed_tokens is not None:
            _copy(model.embed_tokens, t, "embed_tokens", filled)
        return
    if name == "lm_head.weight":
        if model.lm_head is not None:
            _copy(model.lm_head, t, "lm_head", filled)
        return
    if name == "model.norm.weight":
        if model.norm is not None:
            _copy(model.norm.weight, t, "norm.weight", filled)
        return
    m = _LAYER.match(name)
    if m is None:
        return  # e.g. rotary inv_freq buffers some checkpoints carry
    index, rest = int(m.group(1)), m.group(2)
    if index not in model.layer_range:
        return
    local = index - model.layer_range.start
    layer = model.layers[local]
    prefix = f"layers.{local}."
    attn, mlp = layer.self_attn, layer.mlp
    kind = rest.rsplit(".", 1)[-1]   # weight | bias
    if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
        proj = rest.split(".")[1][0]
        heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads, "v": cfg.num_kv_heads}[proj]
        local = attn.q_heads if proj == "q" else attn.kv_heads   # this rank's heads (maybe uneven)
        offset = {"q": 0, "k": attn.q_size, "v": attn.q_size + attn.kv_size}[proj]
        if t.shape[0] != heads * cfg.head_dim:
            raise ModelLoadError(f"weight {name}: shape {tuple(t.shape)} does not fit {heads} heads "
                                 f"of {cfg.head_dim}")
        shard = _rows(t, local.start * cfg.head_dim, len(local) * cfg.head_dim)
        getattr(attn.qkv_proj, kind).data[offset:offset + shard.shape[0]].copy_(shard)
        filled.add(f"{prefix}self_attn.qkv_proj.{kind}#{proj}")
    elif rest == "self_attn.o_proj.weight":
        _copy(attn.o_proj.weight, _cols(t, attn.q_heads.start * cfg.head_dim, attn.q_size),
              prefix + "self_attn.o_proj.weight", filled)
    elif rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        piece = rest.split(".")[1][:-5]   # gate | up
        offset = 0 if piece == "gate" else mlp.inter
        mlp.gate_up_proj.weight.data[offset:offset + mlp.inter].copy_(
            _rows(t, mlp.columns.start, mlp.inter))
        filled.add(f"{prefix}mlp.gate_up_proj.weight#{piece}")
    elif rest == "mlp.down_proj.weight":
        _copy(mlp.down_proj.weight, _cols(t, mlp.columns.start, mlp.inter),
              prefix + "mlp.down_proj.weight", filled)
    elif rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        _copy(getattr(layer, rest.split(".")[0]).weight, t, prefix + rest, filled)


def _expected_pieces(model: CausalLM) -> set[str]:
    """Every parameter, fused ones as one entry per checkpoint tensor they hold."""
    expected = set()
    for name, _ in model.named_parameters():
        if ".qkv_proj." in name:
            expected.update(f"{name}#{p}" for p in "qkv")
        elif ".gate_up_proj." in name:
            expected.update(f"{name}#{p}" for p in ("gate", "up"))
        else:
            expected.add(name)
    return expected


def _rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    return t[start:start + n]


def _cols(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    return t[:, start:start + n]


def _copy(param: torch.Tensor, t: torch.Tensor, name: str, filled: set[str]) -> None:
    if tuple(param.shape) != tuple(t.shape):
        raise ModelLoadError(f"weight {name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(param.shape)}")
    param.data.copy_(t)
    filled.add(name)
