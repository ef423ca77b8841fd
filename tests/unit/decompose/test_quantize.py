"""LoftQ's blockwise quantiser (decompose/quantize.py) against dense references: the NormalFloat
tables (NF4 equal to bitsandbytes' published table, value for value), the nearest-value codes of a
full argmin over the table (PEFT's NFQuantizer rule, ties to the lower index), PEFT's row-major
block layout, and the TP block-layout refusal."""
import pytest
import torch

from parallel_adapters.decompose import quantize

BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]
"""bitsandbytes' NF4 code table (QLoRA, appendix E), which PEFT's NF4 uses."""


def test_normal_tables():
    assert torch.equal(quantize.normal_table(4), torch.tensor(BNB_NF4))
    for bits in (2, 4, 8):
        t = quantize.normal_table(bits)
        assert t.shape == (2 ** bits,) and t.dtype == torch.float32
        assert torch.all(t[1:] > t[:-1]) and t[0] == -1 and t[-1] == 1
        assert (t > 0).sum() == 2 ** (bits - 1) - 1 + 1 and (t == 0).sum() == 1  # one more positive value
    torch.testing.assert_close(quantize.uniform_table(2), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    with pytest.raises(ValueError, match="2, 4 or 8 bits"):
        quantize.normal_table(3)


def dense_reference(w, bits, block, method):
    """Row-major blocks, one scale each, the full argmin over the table (PEFT's NFQuantizer rule)."""
    blocks = w.reshape(-1, block)
    scale = (blocks.abs().amax(1, keepdim=True) if method == "normal"
             else blocks.mean(1, keepdim=True) + 2.5 * blocks.std(1, keepdim=True))
    table = quantize.table(bits, method).to(w.dtype)
    codes = ((blocks / scale)[..., None] - table).abs().argmin(-1)
    return (table[codes] * scale).reshape(w.shape)


@pytest.mark.parametrize("bits,method", [(2, "normal"), (4, "normal"), (8, "normal"), (4, "uniform")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_quantize_matches_the_dense_reference(bits, method, dtype):
    w = torch.randn(12, 48, generator=torch.Generator().manual_seed(bits), dtype=dtype)
    got = quantize.fake_quantize(w, bits, 32, method)
    assert got.dtype == dtype and torch.equal(got, dense_reference(w, bits, 32, method))
    assert 0 < (got - w).abs().max() < w.abs().max() / (1 if bits == 2 else 4)


def test_ties_go_to_the_lower_code_and_zero_blocks_stay_zero():
    t = quantize.uniform_table(2).double()
    mid = (t[1] + t[2]) / 2  # 0: halfway between -1/3 and 1/3
    w = torch.tensor([[1.0, mid, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    codes, _ = quantize.quantize(w, 2, 4, "uniform")
    assert codes[0, 1] == 1
    assert torch.equal(quantize.fake_quantize(w, 4, 4)[1], torch.zeros(4, dtype=torch.float64))


def test_blocks_are_row_major_runs_of_the_flattened_weight():
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w[1, 4] = 50.0  # flat index 10: in the second block of 8: only that block's scale grows
    q = quantize.fake_quantize(w, 4, 8)
    flat = (q - w).flatten().abs()
    assert flat[8:16].max() > 1.0 and flat[:8].max() < 0.5 and flat[16:].max() < 0.5
    with pytest.raises(ValueError, match=r"shape \(4, 6\).*blocks of 16"):
        quantize.quantize(w, 4, 16)


@pytest.mark.parametrize("mode,out_f,in_f,tp,chunks,ok", [
    ("column", 8, 24, 1, 1, True),      # TP=1: PEFT's O*I rule
    ("column", 4, 24, 2, 1, False),     # 2 rows of 24 = 48 per shard
    ("column", 16, 24, 2, 2, False),    # 4 rows per chunk per rank: runs of 96 (fused gate/up)
    ("row", 16, 128, 2, 1, True),       # 64 columns per shard
    ("row", 16, 64, 2, 1, False),       # 32 columns per shard: a block would span two shards
    ("replicated", 1, 64, 4, 1, True),  # the whole W on every rank
])
def test_block_layout_rule(mode, out_f, in_f, tp, chunks, ok):
    if ok:
        quantize.check_block_layout("layers.0.proj", mode, out_f, in_f, tp, chunks)
        return
    with pytest.raises(ValueError, match=rf"layers\.0\.proj.*\[{out_f}, {in_f}\].*TP size {tp}.*multiple of 64"):
        quantize.check_block_layout("layers.0.proj", mode, out_f, in_f, tp, chunks)
