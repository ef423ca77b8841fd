"""ShardSpec against Megatron's own slicing rule (`_initialize_affine_weight_cpu`):
split into stride x tp pieces, rank i keeps pieces i, i + tp, ..."""
import pytest
import torch

from parallel_adapters.distributed.sharding import ShardedTensor, ShardSpec


def _megatron_slice(full, dim, tp, rank, stride):
    pieces = torch.split(full, full.shape[dim] // (tp * stride), dim=dim)
    return torch.cat(pieces[rank::tp], dim=dim)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
def test_shard_matches_megatron_and_round_trips(tp, chunks, dim):
    full = torch.arange(32 * 48, dtype=torch.float64).reshape(32, 48)
    spec = ShardSpec(dim=dim, chunks=chunks)
    shards = [spec.shard(full, i, tp) for i in range(tp)]
    for i, shard in enumerate(shards):
        torch.testing.assert_close(shard, _megatron_slice(full, dim, tp, i, chunks))
        assert shard.shape == spec.local_shape(full.shape, tp)
    assert torch.equal(spec.unshard(shards), full)
    assert spec.global_shape(shards[0].shape, tp) == tuple(full.shape)


def test_replicated_and_json_round_trip():
    spec = ShardSpec()
    t = torch.ones(3, 4)
    assert spec.shard(t, 1, 2) is t and spec.replicated
    for s in (ShardSpec(), ShardSpec(dim=0, chunks=2)):
        assert ShardSpec.from_json(s.to_json()) == s


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="does not split"):
        ShardSpec(dim=0, chunks=2).shard(torch.ones(6, 2), 0, 2)
    with pytest.raises(ValueError, match="chunks"):
        ShardSpec(dim=None, chunks=2)
    with pytest.raises(ValueError, match="unknown fields"):
        ShardSpec.from_json({"dim": 0, "stride": 2})


def test_sharded_tensor_is_frozen():
    t = ShardedTensor(torch.zeros(2), ShardSpec(), (2,))
    with pytest.raises(AttributeError):
        t.spec = ShardSpec(dim=0)
