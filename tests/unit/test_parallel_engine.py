"""Tensor- and pipeline-parallel instances give the tokens of one rank (fp32, greedy).

Ranks are spawned processes in a gloo group on 127.0.0.1 (tests/parallel_ranks.py),
rank 0 stepping them through `ParallelRunner`. Checked on the default model
(9 q / 3 kv heads: tp 2 splits them unevenly, 6+3 / 2+1) and on a tiny random
Llama whose heads divide (with q/k/v biases and an odd MLP width, 161 -> 81 / 80).
Besides the tokens, rank 0 gathers a prompt's KV into the canonical cache (equal
to the one-rank cache), moves it to other blocks, scatters it back to the ranks
and decodes from there: the tokens must not change.
"""
from __future__ import annotations

import pytest
import torch

import kv_transfer.layout
from engine import parallel
from engine.default_model import default_model_path
from engine.model import CausalLM
from engine.model_config import load_model_config
from engine.parallel import ParallelContext, ParallelPlanError, split_range
from engine.weights import load_weights
from kv_transfer.layout import KVLayout
from tests.parallel_ranks import reference, run_instance

PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(1, 20)), [7, 7, 7]]
MAX_TOKENS = 6
TINY_PROMPTS = [[1, 5, 9, 200, 3], list(range(10, 47)), [2, 3]]


def save_tiny_llama(path) -> str:
    """4 q / 2 kv heads (divide by 2), q/k/v biases, MLP width 161 (odd: tp 2 splits it 81 / 80)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=161, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attention_bias=True, tie_word_embeddings=False, initializer_range=0.3)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


# -- the split rule ---------------------------------------------------------------------------------
def test_uneven_heads_go_by_kv_group():
    """9 q / 3 kv over tp 2: KV heads 2 + 1, each with its 3 query heads (6 + 3)."""
    ranks = [ParallelContext(r, 2) for r in range(2)]
    assert [p.kv_heads(3) for p in ranks] == [range(0, 2), range(2, 3)]
    assert [p.q_heads(9, 3) for p in ranks] == [range(0, 6), range(6, 9)]
    assert [p.columns(1536, "intermediate_size") for p in ranks] == [range(0, 768), range(768, 1536)]
    assert [p.columns(161, "intermediate_size") for p in ranks] == [range(0, 81), range(81, 161)]
    assert [ParallelContext(pp_rank=r, pp_size=4).layer_range(30) for r in range(4)] == \
        [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    with pytest.raises(ParallelPlanError, match="num_key_value_heads"):
        ParallelContext(0, 4).kv_heads(3)
    with pytest.raises(ParallelPlanError, match="multiple"):
        ParallelContext(0, 2).q_heads(10, 3)
    with pytest.raises(ValueError, match="tp_size"):   # what the transfer layer's callers catch
        KVLayout.for_rank(30, 3, 64, 16, "bfloat16", tp_rank=0, tp_size=4)


@pytest.mark.parametrize("tp_size,pp_size", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 4), (1, 30)])
def test_transfer_layout_is_the_engine_shard(tp_size, pp_size):
    """KVLayout.for_rank and the model a rank builds agree on its layers and KV heads (one function)."""
    assert kv_transfer.layout.split_range is parallel.split_range is split_range
    cfg = load_model_config(default_model_path())
    for pp in range(pp_size):
        for tp in range(tp_size):
            model = CausalLM(cfg, ParallelContext(tp, tp_size, pp, pp_size), torch.bfloat16, max_positions=8)
            layout = KVLayout.for_rank(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, "bfloat16",
                                       tp_rank=tp, tp_size=tp_size, pp_rank=pp, pp_size=pp_size)
            attn = model.layers[0].self_attn
            assert range(layout.layer_start, layout.layer_end) == model.layer_range
            assert range(layout.head_start, layout.head_end) == attn.kv_heads
            assert attn.num_heads == 3 * attn.num_kv_heads


def test_weight_shards_put_together_are_the_checkpoint(tiny_path):
    """Column shards stacked and row shards side by side give back the one-rank weights."""
    cfg = load_model_config(tiny_path)
    full = CausalLM(cfg, ParallelContext(), torch.float32, 64)
    load_weights(full, tiny_path)
    shards = []
    for r in range(2):
        shards.append(CausalLM(cfg, ParallelContext(r, 2), torch.float32, 64))
        load_weights(shards[-1], tiny_path)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i, layer in enumerate(full.layers):
        parts = [s.layers[i] for s in shards]
        w = layer.self_attn.qkv_proj.weight
        for piece in (slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)):   # q, k, v rows
            got = torch.cat([_piece(p.self_attn, piece, q, kv) for p in parts])
            assert torch.equal(got, w[piece])
        assert torch.equal(torch.cat([p.self_attn.o_proj.weight for p in parts], 1), layer.self_attn.o_proj.weight)
        assert torch.equal(torch.cat([p.mlp.down_proj.weight for p in parts], 1), layer.mlp.down_proj.weight)
        gate = torch.cat([p.mlp.gate_up_proj.weight[:p.mlp.inter] for p in parts])
        assert torch.equal(gate, layer.mlp.gate_up_proj.weight[:cfg.intermediate_size])


def _piece(attn, piece: slice, q: int, kv: int) -> torch.Tensor:
    """This shard's rows of the q, k or v part of its fused qkv weight."""
    local_q, local_kv = attn.q_size, attn.kv_size
    starts = {0: (0, local_q), q: (local_q, local_kv), q + kv: (local_q + local_kv, local_kv)}
    start, n = starts[piece.start]
    return attn.qkv_proj.weight[start:start + n]


# -- multi-rank instances against one rank ----------------------------------------------------------
@pytest.fixture(scope="module")
def default_reference():
    return reference(default_model_path(), PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def tiny_reference(tiny_path):
    return reference(tiny_path, TINY_PROMPTS, MAX_TOKENS, block_size=8)


def _check(out, ref) -> None:
    tokens, (trip_tokens, kv) = out
    ref_tokens, (ref_trip_tokens, ref_kv) = ref
    assert tokens == ref_tokens
    assert trip_tokens == ref_trip_tokens == ref_tokens[0]
    # the gathered canonical KV is the one-rank cache (TP sums in another order: not bit for bit)
    assert kv.shape == ref_kv.shape
    torch.testing.assert_close(kv, ref_kv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tp_size,pp_size", [(2, 1), (1, 2)])
def test_default_model(default_reference, tp_size, pp_size):
    _check(run_instance(default_model_path(), tp_size, pp_size, PROMPTS, MAX_TOKENS), default_reference)


@pytest.mark.parametrize("tp_size,pp_size", [(2, 1), (1, 2), (2, 2)])
def test_tiny_model(tiny_path, tiny_reference, tp_size, pp_size):
    _check(run_instance(tiny_path, tp_size, pp_size, TINY_PROMPTS, MAX_TOKENS, block_size=8), tiny_reference)
