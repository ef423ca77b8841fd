"""IA3 on Megatron's fused linears: which rows `IA3Config.fused_parts` scales, against the q/k/v
and gate/up row layout the HF export uses (hf.mapping.row_segments, an independent description),
and that each TP rank's share of the vector is exactly the scaled rows of its weight shard."""
import pytest
import torch

from parallel_adapters.adapters.kinds.ia3 import fused_row_mask, local_rows
from parallel_adapters.distributed.geometry import LinearGeometry
from parallel_adapters.distributed.sharding import ShardSpec
from parallel_adapters.hf.config import LlamaShape
from parallel_adapters.hf.mapping import row_segments

SHAPE = LlamaShape(num_layers=1, hidden_size=64, intermediate_size=48, num_heads=8, num_kv_heads=4, head_dim=8,
                   vocab_size=10, tie_word_embeddings=False, max_position_embeddings=16, rope_theta=1e4,
                   rms_norm_eps=1e-6)
QKV, FC1 = "decoder.layers.0.self_attention.linear_qkv", "decoder.layers.0.mlp.linear_fc1"


def _geometry(module, tp=1, rank=0):
    rows = SHAPE.qkv_rows if module == QKV else 2 * SHAPE.intermediate_size
    return LinearGeometry("column", SHAPE.hidden_size, rows, 1 if module == QKV else 2, None, tp, rank, False,
                          False, True, False, attention=(SHAPE.num_heads, SHAPE.num_kv_heads, SHAPE.head_dim))


def _labels(module):
    """Per row, the HF module's last name ("k_proj") from the export's row segments."""
    out = []
    for seg in row_segments(module, SHAPE, _geometry(module).out_features, ""):
        out += [seg.hf_name.rsplit(".", 1)[-1]] * (seg.stop - seg.start)
    return out


@pytest.mark.parametrize("module,parts", [(QKV, ("k", "v")), (QKV, ("q",)), (QKV, ("q", "v")), (FC1, ("up",)),
                                          (FC1, ("gate",))])
def test_the_scaled_rows_are_the_named_parts(module, parts):
    expected = torch.tensor([label.removesuffix("_proj") in parts for label in _labels(module)])
    assert torch.equal(fused_row_mask(_geometry(module), parts), expected)


@pytest.mark.parametrize("module,parts", [(QKV, ("k", "v")), (FC1, ("up",))])
@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_holds_the_scaled_rows_of_its_shard(module, parts, tp):
    """The vector split evenly over TP (chunks=1) gives rank i the scaled rows of W_i, in order."""
    full = fused_row_mask(_geometry(module), parts)
    row_ids = full.nonzero().flatten()  # global row of each vector entry
    w_spec = ShardSpec(0, _geometry(module).chunks)
    for rank in range(tp):
        local_w_rows = w_spec.shard(torch.arange(full.numel()), rank, tp)
        mine = ShardSpec(0).shard(row_ids, rank, tp)
        assert torch.equal(local_w_rows[local_rows(_geometry(module, tp, rank), parts)], mine)
