"""get_adapter_model on plain torch modules (ReplicatedLoRA), one process.

References: PEFT's matching rules and management semantics, and a dense float64 recomputation of
y = x W^T + b + s (x A^T) B^T.  Every user error names the field or module.
"""
import pytest
import torch
from torch import nn

from parallel_adapters import LoraConfig, ParallelGroups, get_adapter_model
from parallel_adapters.adapters.hosts.base import AdapterHost as LoRALayerBase
from parallel_adapters.adapters.hosts.linear import ReplicatedHost as ReplicatedLoRA

SINGLE = ParallelGroups.single()


class Block(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.v_proj(torch.relu(self.q_proj(self.norm(x))))


class Tiny(nn.Module):
    def __init__(self, layers=3, width=8):
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.lm_head = nn.Linear(width, 5)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.lm_head(x)


def _model():
    torch.manual_seed(0)
    return Tiny().double()


def _adapt(config, model=None):
    return get_adapter_model(model or _model(), config, groups=SINGLE)


def _wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALayerBase))


def test_list_regex_all_linear_exclude_and_layers():
    assert _wrapped(_adapt(LoraConfig(r=2, target_modules=["q_proj"])).model) == [f"layers.{i}.q_proj" for i in range(3)]
    assert _wrapped(_adapt(LoraConfig(r=2, target_modules=r"layers\.1\..*proj")).model) == ["layers.1.q_proj", "layers.1.v_proj"]
    all_linear = _wrapped(_adapt(LoraConfig(r=2, target_modules="all-linear")).model)
    assert len(all_linear) == 6 and "lm_head" not in all_linear
    excluded = _wrapped(_adapt(LoraConfig(r=2, target_modules="all-linear", exclude_modules=["v_proj"])).model)
    assert excluded == [f"layers.{i}.q_proj" for i in range(3)]
    picked = _wrapped(_adapt(LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 2], layers_pattern="layers")).model)
    assert picked == ["layers.0.q_proj", "layers.2.q_proj"]


def test_forward_matches_dense_and_base_keys_unchanged():
    base = _model()
    keys_before = set(base.state_dict())
    model = _adapt(LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False), base)
    layer = model.model.layers[1].q_proj
    assert isinstance(layer, ReplicatedLoRA)
    x = torch.randn(4, 8, dtype=torch.float64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ layer.weight.T + layer.bias + 3.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    assert {k for k in model.model.state_dict() if "lora_" not in k} == keys_before


def test_only_adapters_train_and_bias_modes():
    model = _adapt(LoraConfig(r=2, target_modules=["q_proj"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    lora_only = _adapt(LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    names = [n for n, p in lora_only.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert sorted(names) == [f"model.layers.{i}.q_proj.bias" for i in range(3)]
    all_bias = _adapt(LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    assert sum(p.requires_grad for n, p in all_bias.named_parameters() if n.endswith("bias")) == 3 * 3 + 1
    saved = _adapt(LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert saved.model.lm_head.weight.requires_grad


def test_init_modes_and_tp_invariant_seed():
    z = _adapt(LoraConfig(r=2, target_modules=["q_proj"])).model.layers[0].q_proj
    assert torch.count_nonzero(z.lora_B["default"].weight) == 0 and z.lora_A["default"].weight.abs().max() <= 8 ** -0.5
    g = _adapt(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian")).model.layers[0].q_proj
    assert torch.count_nonzero(g.lora_B["default"].weight) == 0
    again = _adapt(LoraConfig(r=2, target_modules=["q_proj"])).model.layers[0].q_proj
    assert torch.equal(again.lora_A["default"].weight, z.lora_A["default"].weight)
    other = _adapt(LoraConfig(r=2, target_modules=["q_proj"], seed=1)).model.layers[0].q_proj
    assert not torch.equal(other.lora_A["default"].weight, z.lora_A["default"].weight)


def test_rank_and_alpha_patterns_and_rslora():
    model = _adapt(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={r"layers\.1\.q_proj": 2},
                              alpha_pattern={"q_proj": 16}, use_rslora=True))
    l0, l1 = model.model.layers[0].q_proj, model.model.layers[1].q_proj
    assert (l0.r["default"], l1.r["default"]) == (4, 2)
    assert l0.scaling["default"] == pytest.approx(16 / 2) and l1.scaling["default"] == pytest.approx(16 / 2 ** 0.5)


def test_named_adapters_disable_merge_unmerge_unload():
    model = _adapt(LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        with model.disable_adapter():
            base_out = model(x)
        out_default = model(x)
        model.add_adapter("other", LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False, seed=5))
        assert torch.equal(model(x), out_default)  # adding does not activate
        model.set_adapter("other")
        out_other = model(x)
        assert not torch.allclose(out_other, out_default)
        model.set_adapter("default")
        weights = [l.weight.clone() for _, l in model.adapter_layers()]
        model.merge_adapter()
        torch.testing.assert_close(model(x), out_default, atol=1e-12, rtol=0)
        model.unmerge_adapter()
        assert all(torch.equal(w, l.weight) for w, (_, l) in zip(weights, model.adapter_layers()))
        model.delete_adapter("other")
        assert "other" not in model.peft_config
        plain = model.merge_and_unload()
        assert not _wrapped(plain)
        torch.testing.assert_close(plain(x), out_default, atol=1e-12, rtol=0)
    unloaded = _adapt(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        torch.testing.assert_close(unloaded.unload()(x), base_out, atol=0, rtol=0)


def test_safe_merge_refuses_non_finite():
    model = _adapt(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.model.layers[0].q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    before = layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.weight, before)


def test_print_trainable_parameters(capsys):
    model = _adapt(LoraConfig(r=2, target_modules=["q_proj"]))
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 3 * (2 * 8 + 8 * 2) and f"{trainable:,d}" in capsys.readouterr().out and total > trainable


@pytest.mark.parametrize("config,match", [
    (dict(target_modules=["nope"]), r"matches no adaptable module.*layers\.0\.q_proj"),
    (dict(r=9, target_modules=["q_proj"]), r"r .*= 9 for module layers\.0\.q_proj exceeds"),
    (dict(r=2, target_modules=["q_proj"], rank_pattern={"k_proj": 1}), "rank_pattern key 'k_proj' matches no"),
    (dict(r=2, target_modules=["q_proj"], alpha_pattern={"k_proj": 1}), "alpha_pattern key 'k_proj' matches no"),
    (dict(r=2, target_modules=["q_proj"], modules_to_save=["head"]), "modules_to_save entry 'head'"),
])
def test_user_errors_name_the_field_or_module(config, match):
    with pytest.raises(ValueError, match=match):
        _adapt(LoraConfig(**config))


def test_same_adapter_twice_and_unknown_adapter():
    model = _adapt(LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has adapters"):
        get_adapter_model(model, LoraConfig(r=2), groups=SINGLE)
    with pytest.raises(ValueError, match="already applied"):
        get_adapter_model(model.model, LoraConfig(r=2, target_modules=["q_proj"]), groups=SINGLE)
    with pytest.raises(ValueError, match="unknown adapter 'x'"):
        model.set_adapter("x")


def test_config_is_not_mutated():
    config = LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={"q_proj": 1})
    snapshot = config.to_dict()
    _adapt(config)
    assert config.to_dict() == snapshot


def test_plain_model_without_parallel_state_runs_as_one_process():
    """As under PEFT; a Megatron model is refused instead (tests/unit/adapters/test_world_one.py)."""
    from parallel_adapters.mcore.compat import destroy_model_parallel

    destroy_model_parallel()
    assert get_adapter_model(_model(), LoraConfig(r=2, target_modules=["q_proj"])).groups == SINGLE


def test_module_size_that_tp_does_not_divide_is_named():
    from parallel_adapters.adapters.inject import Target, check_divisible
    from parallel_adapters.mcore.compat import LinearGeometry

    geometry = LinearGeometry("column", 16, 30, 1, None, 4, 0, False, False, True, False)
    with pytest.raises(ValueError, match=r"module decoder\.layers\.0\.mlp\.linear_fc1: size 30 does not divide over 4"):
        check_divisible(Target("x", "decoder.layers.0.mlp.linear_fc1", nn.Identity()), geometry)


def test_half_precision_base_keeps_float32_factors_and_trains_them():
    """PEFT's autocast_adapter_dtype: bf16 base, float32 factors, bf16 compute and output."""
    base = _model().to(torch.bfloat16)
    model = get_adapter_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False), groups=SINGLE)
    layer = model.model.layers[0].q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == b.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    x = torch.randn(4, 8, dtype=torch.float64)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    w, bias = layer.weight.double(), layer.bias.double()
    expected = x.to(torch.bfloat16).double() @ w.T + bias + 2.0 * (x @ a.double().T) @ b.double().T
    torch.testing.assert_close(y.double(), expected, atol=5e-2, rtol=2e-2)
    model(torch.randn(3, 8).to(torch.bfloat16)).float().pow(2).sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and a.grad.abs().sum() > 0
    assert layer.weight.grad is None  # the base stays frozen
    merged = model.merge_and_unload()
    assert merged.layers[0].q_proj.weight.dtype == torch.bfloat16
    plain = get_adapter_model(_model().to(torch.bfloat16), LoraConfig(r=2, target_modules=["q_proj"]),
                              groups=SINGLE, autocast_adapter_dtype=False)
    assert plain.model.layers[0].q_proj.lora_A["default"].weight.dtype == torch.bfloat16

