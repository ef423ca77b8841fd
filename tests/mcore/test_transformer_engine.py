"""Transformer Engine layers (TEColumnParallelLinear / TERowParallelLinear) wrapped like Megatron's
local ones.  Runs only where TE and a GPU exist; skipped (never faked) elsewhere.
Oracle: the same LoRA math on the TE layer's own weight, and TE's own forward with adapters off."""
import pytest
import torch

te = pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
if not torch.cuda.is_available():
    pytest.skip("Transformer Engine paths need a GPU", allow_module_level=True)


def te_parity_job(mode):
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from parallel_adapters import LoraConfig, get_adapter_model
    from parallel_adapters.mcore.compat import initialize_model_parallel

    groups = initialize_model_parallel(1, 1)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, params_dtype=torch.float32)
    cls = TEColumnParallelLinear if mode == "column" else TERowParallelLinear
    kwargs = dict(gather_output=False) if mode == "column" else dict(input_is_parallel=True)
    base = cls(64, 96, config=config, init_method=torch.nn.init.normal_, bias=False, skip_bias_add=False,
               is_expert=False, **kwargs).cuda()
    host = torch.nn.Module()
    host.proj = base
    x = torch.randn(8, 2, 64, device="cuda")
    with torch.no_grad():
        reference = base(x)[0]
    model = get_adapter_model(host, LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False), groups=groups)
    layer = model.model.proj
    with torch.no_grad():
        with model.disable_adapter():
            off = layer(x)[0]
        on = layer(x)[0]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = off + layer.scaling["default"] * (x @ a.T) @ b.T
    return (off - reference).abs().max().item(), (on - expected).abs().max().item()


@pytest.mark.parametrize("mode", ["column", "row"])
def test_te_layers_match_their_own_forward_plus_lora(pool2, mode):
    for base_err, lora_err in pool2.run(te_parity_job, mode):
        assert base_err < 1e-5 and lora_err < 1e-5
