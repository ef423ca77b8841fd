"""IA3 and LoHa at world size 1 on plain nn.Linear layers against Hugging Face PEFT's own IA3 and
LoHa (the oracle): the same base and adapter tensor values (random, so scales are not 1 and LoHa's
w2b is not 0), fp32.  Outputs and gradients (input and every adapter tensor) within 1e-6 of each
tensor's largest entry; merge_and_unload gives PEFT's merged weights and biases (IA3 scales the
bias of an output-scaled layer); merge then unmerge restores the base exactly.  Also PEFT's
initial values (IA3: ones; LoHa: dW = 0) and the configs' validation.
"""
import copy

import pytest
import torch

from tests.helpers.peft_oracle import Two, check_merge_and_unmerge, check_outputs_and_gradients, close, copy_into_peft
from parallel_adapters import IA3Config, LoHaConfig, ParallelGroups, get_adapter_model

peft = pytest.importorskip("peft")

IN_F, OUT_F, R = 16, 12, 4
NAMES = ("q_proj", "v_proj")


def _configs(kind):
    if kind == "ia3":  # q_proj scales its output (and bias), v_proj its input
        return (IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=["v_proj"]),
                peft.IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=["v_proj"]))
    kw = dict(r=R, alpha=6, target_modules=list(NAMES), rank_pattern={"v_proj": 2})
    return LoHaConfig(**kw), peft.LoHaConfig(**kw)


def _pair(kind):
    torch.manual_seed(0)
    base = Two()
    ours_config, peft_config = _configs(kind)
    ours = get_adapter_model(copy.deepcopy(base), ours_config, groups=ParallelGroups.single())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    # IA3: scales around 1; LoHa: dW of the base's order
    copy_into_peft(ours, theirs, NAMES, lambda shape: (1 if kind == "ia3" else 0) + 0.5 * torch.randn(shape))
    return ours, theirs


@pytest.mark.parametrize("kind", ["ia3", "loha"])
def test_outputs_and_gradients_match_peft(kind):
    ours, theirs = _pair(kind)
    check_outputs_and_gradients(ours, theirs, torch.randn(3, 5, IN_F))


@pytest.mark.parametrize("kind", ["ia3", "loha"])
def test_merge_matches_peft_and_unmerge_is_exact(kind):
    ours, theirs = _pair(kind)
    w0, plain = check_merge_and_unmerge(ours, theirs, torch.randn(4, IN_F), NAMES)
    if kind == "ia3":  # the output-scaled layer's bias is scaled, the input-scaled one's is not
        assert not torch.equal(plain.q_proj.bias, w0["q_proj"][1]) and torch.equal(plain.v_proj.bias, w0["v_proj"][1])


def test_initial_values_are_peft_s():
    ia3 = get_adapter_model(Two(), IA3Config(target_modules=list(NAMES), feedforward_modules=["v_proj"]),
                            groups=ParallelGroups.single())
    assert torch.equal(ia3.model.q_proj.ia3_l["default"].weight, torch.ones(OUT_F, 1))
    assert torch.equal(ia3.model.v_proj.ia3_l["default"].weight, torch.ones(1, OUT_F))
    loha = get_adapter_model(Two(), LoHaConfig(r=R, target_modules=list(NAMES)), groups=ParallelGroups.single())
    t = loha.model.q_proj.adapter_tensors("default")
    assert torch.equal(t["hada_w2_b"], torch.zeros(R, IN_F)) and t["hada_w1_a"].abs().max() > 0
    bound = 1 / R ** 0.5  # Kaiming-uniform(a=sqrt(5)) on [O, r]
    assert t["hada_w1_a"].abs().max() <= bound and t["hada_w1_a"].shape == (OUT_F, R)
    random = get_adapter_model(Two(), LoHaConfig(r=R, target_modules=list(NAMES), init_weights=False),
                               groups=ParallelGroups.single())
    assert random.model.q_proj.adapter_tensors("default")["hada_w2_b"].abs().max() > 0


@pytest.mark.parametrize("kwargs,field", [
    (dict(fan_in_fan_out=True), "IA3Config.fan_in_fan_out"),
    (dict(target_modules=["a"], feedforward_modules=["b"]), "IA3Config.feedforward_modules"),
    (dict(fused_parts={"linear_qkv": ["x"]}), r"IA3Config.fused_parts\['linear_qkv'\]"),
    (dict(fused_parts={"linear_proj": ["k"]}), "IA3Config.fused_parts key 'linear_proj'"),
    (dict(target_modules=[]), "IA3Config.target_modules"),
])
def test_ia3_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        IA3Config(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "LoHaConfig.r"), (dict(alpha=-1), "LoHaConfig.alpha"),
    (dict(rank_dropout=1.0), "LoHaConfig.rank_dropout"), (dict(module_dropout=True), "LoHaConfig.module_dropout"),
    (dict(rank_pattern={"x": 0}), r"LoHaConfig.rank_pattern\['x'\]"),
])
def test_loha_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoHaConfig(**kwargs)


def test_configs_round_trip_through_dicts():
    for config in (IA3Config(fused_parts={"linear_qkv": ["v", "k"]}), LoHaConfig(r=2, layers_to_transform=1)):
        assert type(config).from_dict(config.to_dict()) == config
    assert IA3Config(fused_parts={"linear_qkv": ["v", "k"]}).fused_parts == {"linear_qkv": ("k", "v")}


@pytest.mark.parametrize("kind", ["ia3", "loha"])
def test_save_pretrained_loads_in_peft_and_back(kind, tmp_path):
    """Our save_pretrained directory loads in PEFT (same outputs) and in our from_pretrained."""
    from parallel_adapters.adapters.model import AdapterModel

    ours, _ = _pair(kind)
    ours.eval()
    x = torch.randn(2, IN_F)
    expected = ours(x).detach()
    ours.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = Two()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    close(theirs(x).detach(), expected, "PEFT from our directory")
    again = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(again.peft_config["default"]) is type(ours.peft_config["default"])
    close(again(x).detach(), expected, "ours from our directory")
