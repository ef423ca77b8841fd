"""LoKr at world size 1 on plain nn.Linear layers against Hugging Face PEFT's own LoKr (the
oracle): the same base and adapter tensor values (random, so w1 is not 0), fp32.  Three layouts:
both factors whole (large r), w2 a rank-r product (small r), both products (`decompose_both`),
with a rank_pattern and a decompose_factor.  Outputs and gradients (input and every adapter
tensor) within 1e-6 of each tensor's largest entry; merge_and_unload gives PEFT's merged weights;
merge then unmerge restores the base exactly.  Also PEFT's shapes and initial values, PEFT's
factorisation, save_pretrained into PEFT and back, and the config's validation.
"""
import copy

import pytest
import torch

from tests.helpers.peft_oracle import Two, check_outputs_and_gradients, close, copy_into_peft
from parallel_adapters import LoKrConfig, ParallelGroups, get_adapter_model
from parallel_adapters.adapters.kinds.lokr import factorization

peft = pytest.importorskip("peft")
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

IN_F, OUT_F = 16, 12
NAMES = ("q_proj", "v_proj")
LAYOUTS = {
    "whole": dict(r=8, alpha=6),
    "w2-product": dict(r=1, alpha=3, rank_pattern={"v_proj": 2}, decompose_factor=2),
    "both-products": dict(r=1, alpha=2, decompose_both=True),
}
EXPECTED = {"whole": {"lokr_w1", "lokr_w2"}, "w2-product": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
            "both-products": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}}


def _pair(layout):
    torch.manual_seed(0)
    base = Two()
    kw = dict(target_modules=list(NAMES), **LAYOUTS[layout])
    ours = get_adapter_model(copy.deepcopy(base), LoKrConfig(**kw), groups=ParallelGroups.single())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**kw))
    for name in NAMES:
        o, p = getattr(ours.model, name), getattr(theirs.base_model.model, name)
        assert set(o.adapter_tensors("default")) == EXPECTED[layout], (layout, name)
        assert set(o.adapter_tensors("default")) == {n for n in p.adapter_layer_names if "default" in getattr(p, n)}
    copy_into_peft(ours, theirs, NAMES, lambda shape: 0.5 * torch.randn(shape))
    return ours, theirs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_and_gradients_match_peft(layout):
    ours, theirs = _pair(layout)
    check_outputs_and_gradients(ours, theirs, torch.randn(3, 5, IN_F))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merge_matches_peft_and_unmerge_is_exact(layout):
    ours, theirs = _pair(layout)
    x = torch.randn(4, IN_F)
    before = ours(x).detach()
    w0 = {n: getattr(ours.model, n).weight.clone() for n in NAMES}
    ours.merge_adapter()
    close(ours(x), before, "merged output")
    ours.unmerge_adapter()
    for n in NAMES:
        assert torch.equal(getattr(ours.model, n).weight, w0[n]), n
    plain, peft_plain = ours.merge_and_unload(), theirs.merge_and_unload()
    for n in NAMES:
        close(getattr(plain, n).weight, getattr(peft_plain, n).weight, f"{n}.weight")
        assert not torch.equal(getattr(plain, n).weight, w0[n])


@pytest.mark.parametrize("init", [True, "lycoris", False])
def test_initial_values_are_peft_s(init):
    """The zero factor PEFT picks (w1 / w1_a for True, w2 / w2_b for "lycoris", none for False), and
    Kaiming-uniform bounds elsewhere; dW = 0 unless init_weights=False."""
    for layout, kw in LAYOUTS.items():
        model = get_adapter_model(Two(), LoKrConfig(target_modules=list(NAMES), init_weights=init, **kw),
                                  groups=ParallelGroups.single())
        t = model.model.q_proj.adapter_tensors("default")
        zero = {True: {"lokr_w1", "lokr_w1_a"}, "lycoris": {"lokr_w2", "lokr_w2_b"}, False: set()}[init]
        for name, tensor in t.items():
            assert (tensor.abs().max() == 0) == (name in zero), (layout, name)
            assert tensor.abs().max() <= 1 / tensor.shape[1] ** 0.5, (layout, name)
        delta = model.model.q_proj.weight.clone()
        model.merge_adapter()
        assert torch.equal(model.model.q_proj.weight, delta) == (init is not False), layout


def test_factorization_is_peft_s():
    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 8):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "LoKrConfig.r"), (dict(alpha=-1), "LoKrConfig.alpha"),
    (dict(rank_dropout=1.0), "LoKrConfig.rank_dropout"), (dict(module_dropout=-0.5), "LoKrConfig.module_dropout"),
    (dict(rank_pattern={"x": 0}), r"LoKrConfig.rank_pattern\['x'\]"),
    (dict(decompose_factor=0), "LoKrConfig.decompose_factor"), (dict(init_weights="x"), "LoKrConfig.init_weights"),
    (dict(decompose_both=1), "LoKrConfig.decompose_both"),
    (dict(use_effective_conv2d=1), "LoKrConfig.use_effective_conv2d"),
    (dict(rank_dropout_scale=1), "LoKrConfig.rank_dropout_scale"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoKrConfig(**kwargs)


def test_config_round_trips_through_dicts():
    config = LoKrConfig(r=2, layers_to_transform=1, decompose_both=True, decompose_factor=4, init_weights="lycoris")
    assert LoKrConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_pretrained_loads_in_peft_and_back(layout, tmp_path):
    from parallel_adapters.adapters.model import AdapterModel

    ours, _ = _pair(layout)
    ours.eval()
    x = torch.randn(2, IN_F)
    expected = ours(x).detach()
    ours.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = Two()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    close(theirs(x).detach(), expected, "PEFT from our directory")
    again = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(again.peft_config["default"]) is LoKrConfig
    close(again(x).detach(), expected, "ours from our directory")


@pytest.mark.parametrize("tp,ok", [(1, True), (2, True), (4, False)])
def test_fused_chunks_split_w1_within_each_block(tp, ok):
    """A column layer of 2 fused blocks (linear_fc1's [gate; up], partition_stride 2): [32, 16] is
    (4x8) x (4x4), so w1's rows split per block at TP 1 and 2 only (4 % (2 tp))."""
    from parallel_adapters.adapters.kinds.lokr import LOKR
    from parallel_adapters.distributed.geometry import LinearGeometry
    from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec

    g = LinearGeometry("column", 16, 32, 2, None, tp, 0, False, False, True, False)
    config = LoKrConfig(r=8, target_modules=["linear_fc1"])
    if not ok:
        with pytest.raises(ValueError, match=r"module m.linear_fc1: .*\(4x8\) x \(4x4\).*in each of 2 fused blocks"
                                             r".*TP sizes \[1, 2\]"):
            LOKR.settings(config, "m.linear_fc1", g)
        return
    settings = LOKR.settings(config, "m.linear_fc1", g)
    w1, w2 = LOKR.tensors(g, settings.hparams)
    assert (w1.name, w1.global_shape, w1.spec) == ("lokr_w1", (4, 4), ShardSpec(dim=0, chunks=2))
    assert (w2.name, w2.global_shape, w2.spec) == ("lokr_w2", (8, 4), REPLICATED)
