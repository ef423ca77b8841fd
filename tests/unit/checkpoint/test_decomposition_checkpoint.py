"""A PiSSA checkpoint in one process: `checkpoint_tensors` (what every engine's save writes) carries
the initial factors, loading rebuilds the residual base bit-exactly, and a checkpoint without them
(what ZeRO's save wrote before it used checkpoint_tensors) is refused instead of training the
factors on the original base.

Oracle: the PiSSA-initialised model itself (its residual base and factors)."""
import pytest
import torch
from torch import nn

from parallel_adapters import LoraConfig, ParallelGroups, get_adapter_model, load_checkpoint, save_checkpoint
from parallel_adapters.checkpoint.adapter_io import checkpoint_config, checkpoint_tensors
from parallel_adapters.checkpoint.layout import CheckpointError
from parallel_adapters.checkpoint.sharded import save_sharded


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 12, bias=False)
        self.v_proj = nn.Linear(12, 16, bias=False)


def _model(init):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init, seed=1)
    return get_adapter_model(Two(), config, groups=ParallelGroups.single())


def test_checkpoint_rebuilds_the_residual_and_refuses_one_without_initial_factors(tmp_path):
    pissa = _model("pissa_niter_2")
    tensors = checkpoint_tensors(pissa)
    assert sorted(n for n in tensors if n.endswith(".initial")) == sorted(
        f"{m}.lora_{t}.default.initial" for m in ("q_proj", "v_proj") for t in "AB")
    save_checkpoint(pissa, tmp_path / "full")
    fresh = _model(True)
    load_checkpoint(fresh, tmp_path / "full")
    for name in ("q_proj", "v_proj"):
        assert torch.equal(getattr(fresh.model, name).weight, getattr(pissa.model, name).weight), name
    assert fresh.peft_config["default"].init_lora_weights == "pissa_niter_2"

    save_sharded(tmp_path / "no_initial", pissa.adapter_state_dict(), pissa.groups, checkpoint_config(pissa))
    with pytest.raises(CheckpointError, match="no initial factors"):
        load_checkpoint(_model(True), tmp_path / "no_initial")
