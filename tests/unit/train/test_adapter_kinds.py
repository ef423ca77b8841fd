"""The run config's adapter section for every kind: `adapter.kind` picks the config (default lora),
a field the kind does not have is refused naming the kind and the field, EVA stays LoRA's, and a
resumed run rebuilds the checkpoint's adapter (its kind, its stored config)."""
import json

import pytest

from parallel_adapters.config import IA3Config, LoHaConfig, LoKrConfig, LoraConfig
from parallel_adapters.train import runner
from parallel_adapters.train.run_config import load_run_config
from parallel_adapters.train.validate import validate_run_config


@pytest.mark.parametrize("kind,cls", [("lora", LoraConfig), ("loha", LoHaConfig), ("lokr", LoKrConfig),
                                      ("ia3", IA3Config)])
def test_kind_picks_the_config(kind, cls):
    config = load_run_config(None, [f"adapter.kind={kind}", "adapter.seed=4"])
    validate_run_config(config)
    assert type(config.adapter) is cls and config.adapter.seed == 4
    assert type(runner.adapter_config(config, None)) is cls
    assert type(load_run_config(None, []).adapter) is LoraConfig


@pytest.mark.parametrize("overrides,named", [
    (["adapter.kind=loha", "adapter.lora_alpha=4"], r"\['adapter.lora_alpha'\] are not fields of adapter kind 'loha'"),
    (["adapter.kind=ia3", "adapter.use_dora=true"], r"\['adapter.use_dora'\] are not fields of adapter kind 'ia3'"),
    (["adapter.kind=lokr", "adapter.feedforward_modules=[]"], r"adapter.feedforward_modules'\] .* kind 'lokr'"),
    (["adapter.alpha=4"], r"\['adapter.alpha'\] are not fields of adapter kind 'lora'"),
    (["adapter.kind=dora"],
     r"adapter.kind: 'dora' is not an adapter kind; one of \['ia3', 'loha', 'lokr', 'lora', 'p_tuning', 'prefix_tuning', 'prompt_tuning'\]"),
    (["adapter.kind=lokr", "adapter.rank_dropout=1.0"], r"LoKrConfig.rank_dropout"),
    # accepted by the Python API (PEFT ignores them under another init), refused in a run
    (["adapter.corda_config={corda_method: kpm}"], r"adapter.corda_config configures init_lora_weights='corda'"),
    (["adapter.init_lora_weights=pissa", "adapter.loftq_config={loftq_bits: 2}"],
     r"adapter.loftq_config configures init_lora_weights='loftq', but adapter.init_lora_weights is 'pissa'"),
])
def test_unknown_or_bad_fields_are_refused_naming_kind_and_field(overrides, named):
    with pytest.raises(ValueError, match=named):
        load_run_config(None, overrides)


@pytest.mark.parametrize("kind", ["loha", "lokr", "ia3"])
def test_eva_is_lora_only(kind):
    config = load_run_config(None, [f"adapter.kind={kind}", "eva={}"])
    with pytest.raises(ValueError, match=rf"eva: EVA initialises LoRA adapters only; adapter.kind is '{kind}'"):
        validate_run_config(config)


def _checkpoint(tmp_path, adapter, kind):
    data = dict(adapter.to_dict(), adapter_name="default", adapter_kind=kind, tp_size=2, pp_size=1)
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("kind,overrides", [("loha", ["adapter.r=4", "adapter.alpha=2"]),
                                            ("lokr", ["adapter.decompose_factor=4", "adapter.init_weights=lycoris"]),
                                            ("ia3", ["adapter.fused_parts={linear_qkv: [v]}"])])
def test_resume_rebuilds_the_checkpoints_kind_and_refuses_another(tmp_path, kind, overrides):
    config = load_run_config(None, [f"adapter.kind={kind}", *overrides])
    ckpt = _checkpoint(tmp_path, config.adapter, kind)
    assert runner.adapter_config(config, ckpt) == config.adapter
    assert runner.saved_adapter_config(ckpt) == config.adapter
    with pytest.raises(ValueError, match=rf"holds a '{kind}' adapter, the run config has adapter.kind='lora'"):
        runner.adapter_config(load_run_config(None, []), ckpt)
    with pytest.raises(ValueError, match=r"was trained with adapter.seed=0, the run config has 9"):
        runner.adapter_config(load_run_config(None, [f"adapter.kind={kind}", *overrides, "adapter.seed=9"]), ckpt)


def test_resume_of_a_dora_checkpoint_is_lora_with_use_dora(tmp_path):
    config = load_run_config(None, ["adapter.use_dora=true"])
    ckpt = _checkpoint(tmp_path, config.adapter, "dora")
    assert runner.adapter_config(config, ckpt).use_dora
