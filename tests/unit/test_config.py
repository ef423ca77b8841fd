"""LoraConfig / EvaConfig: PEFT field names and defaults, validation naming the field, immutability."""
import dataclasses

import pytest

from parallel_adapters.config import EvaConfig, LoraConfig, lora_scaling


def test_defaults_follow_peft():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias, c.init_lora_weights, c.use_rslora) == (8, 8, 0.0, "none", True, False)
    e = EvaConfig()
    assert (e.rho, e.tau, e.use_label_mask, e.label_mask_value, e.whiten, e.adjust_scaling_factors) == (2.0, 0.99, True, -100, False, True)


@pytest.mark.parametrize("field,value", [
    ("r", 0), ("r", -1), ("r", 2.5), ("lora_alpha", 0), ("lora_alpha", -1.0), ("lora_dropout", 1.0),
    ("bias", "some"), ("init_lora_weights", "CorDA"), ("init_lora_weights", "pissa_niter_"), ("target_modules", []),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**{field: value})


def test_pattern_values_are_validated():
    with pytest.raises(ValueError, match="rank_pattern"):
        LoraConfig(rank_pattern={"linear_qkv": 0})
    with pytest.raises(ValueError, match="alpha_pattern"):
        LoraConfig(alpha_pattern={"linear_qkv": -2})


def test_frozen_and_replace_revalidates():
    c = LoraConfig(r=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.r = 8
    assert c.replace(r=16).r == 16 and c.r == 4
    with pytest.raises(ValueError, match="r must"):
        c.replace(r=0)


def test_dict_round_trip_and_unknown_field():
    c = LoraConfig(r=4, rank_pattern={"fc1": 2}, init_lora_weights="eva", eva_config=EvaConfig(rho=1.5))
    again = LoraConfig.from_dict(c.to_dict())
    assert again == c and again.eva_config.rho == 1.5
    with pytest.raises(ValueError, match="unknown field"):
        LoraConfig.from_dict({"r": 4, "lora_rank": 2})


def test_eva_init_gets_default_eva_config_and_scaling():
    assert LoraConfig(init_lora_weights="eva").eva_config == EvaConfig()
    assert lora_scaling(16, 4, False) == 4.0
    assert lora_scaling(16, 4, True) == 8.0
    with pytest.raises(ValueError, match="tau"):
        EvaConfig(tau=0)
