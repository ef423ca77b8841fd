"""The rank-2r conversion of a PiSSA/OLoRA adapter against PEFT's own
`save_pretrained(path_initial_model_for_weight_conversion=...)`: the same tensors and config."""
import json

import pytest
import torch
from torch import nn

from parallel_adapters.checkpoint.decomposition_export import convert_view, converted_config, converted_factors
from parallel_adapters.user_errors import UserError


@pytest.mark.parametrize("rslora", [False, True])
def test_conversion_matches_peft(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10, bias=False), nn.Linear(10, 8, bias=False))
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["0", "1"], init_lora_weights="olora", use_rslora=rslora)
    model = get_peft_model(base, config)
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter as plain LoRA
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = "olora"
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))  # "training"
    model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    peft_tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    peft_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())

    ours = converted_config({"r": 3, "lora_alpha": 6, "use_rslora": rslora, "init_lora_weights": "olora"})
    assert (ours["r"], ours["lora_alpha"], ours["init_lora_weights"]) == (
        peft_config["r"], pytest.approx(peft_config["lora_alpha"]), peft_config["init_lora_weights"])
    params = dict(model.named_parameters())
    for layer in ("0", "1"):
        key = f"base_model.model.{layer}.lora_%s.default.weight"
        a, b = converted_factors(params[key % "A"], params[key % "B"], initial[key % "A"], initial[key % "B"])
        saved = f"base_model.model.{layer}.lora_%s.weight"
        torch.testing.assert_close(a, peft_tensors[saved % "A"], rtol=0, atol=0)
        torch.testing.assert_close(b, peft_tensors[saved % "B"], rtol=0, atol=0)


def test_without_initial_factors_and_rslora_patterns():
    meta = {"m.lora_A.default.weight": torch.empty(2, 4, device="meta"),
            "m.lora_B.default.weight": torch.empty(4, 2, device="meta")}
    with pytest.raises(UserError, match="has none"):
        convert_view(meta, meta.__getitem__, {"r": 2, "lora_alpha": 4}, True, "export")
    assert convert_view(meta, meta.__getitem__, {"r": 2}, False, "export")[2] == {"r": 2}
    with pytest.raises(UserError, match="refuses it too"):
        converted_config({"r": 2, "lora_alpha": 4, "use_rslora": True, "rank_pattern": {"m": 4}})
    with pytest.raises(UserError, match="--convert-to-lora"):
        convert_view({**meta, "m.lora_A.default.initial": meta["m.lora_A.default.weight"]}, None,
                     {"init_lora_weights": "pissa"}, False, "export")
