"""The adapter-kind registry (`adapters/kinds/__init__.py`) and the LoRA kind's declarations.

References: the protocol's slot list (kinds/protocol.py), the sharding rule of
`functional.lora_factor_specs`, and the names PEFT uses for LoRA (`peft_type` "LORA", keys
`<module>.lora_A.weight`).
"""
import pytest

from parallel_adapters import LoraConfig
from parallel_adapters.adapters import kinds
from parallel_adapters.adapters.functional import lora_factor_specs
from parallel_adapters.adapters.kinds.lora import LORA
from parallel_adapters.adapters.kinds.protocol import LOCAL_ADDEND, SLOTS, WEIGHT_DELTA, AdapterKind
from parallel_adapters.distributed.groups import GROUP_OF_ONE
from parallel_adapters.mcore.compat import LinearGeometry


class _Named(AdapterKind):
    def __init__(self, name, slot_table=None):
        self.name = name
        self.slot_table = slot_table or {"replicated": frozenset({LOCAL_ADDEND})}


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so registrations here do not leak into other tests."""
    kinds.kind_names()  # the built-ins are in before the copy
    monkeypatch.setattr(kinds, "_REGISTRY", dict(kinds._REGISTRY))
    return kinds


def _geometry(mode, chunks=1):
    return LinearGeometry(mode, 16, 24, chunks, GROUP_OF_ONE, 2, 0, False, False, True, False)


def test_lora_is_built_in_and_found_by_name_and_config():
    assert "lora" in kinds.kind_names()
    assert kinds.get_kind("lora") is LORA
    assert kinds.kind_for_config(LoraConfig(r=2)) is LORA


def test_use_dora_picks_the_dora_kind():
    from parallel_adapters.adapters.kinds.dora import DORA, MAGNITUDE

    assert kinds.get_kind("dora") is DORA
    assert kinds.kind_for_config(LoraConfig(r=2, use_dora=True)) is DORA
    assert DORA.peft_type == "LORA" and DORA.peft_key(MAGNITUDE) == "lora_magnitude_vector"
    assert DORA.peft_key("lora_A") == "lora_A.weight" and DORA.hyperparameters == LORA.hyperparameters
    with pytest.raises(ValueError, match="use_dora=True with init_lora_weights='eva' is not supported"):
        LoraConfig(use_dora=True, init_lora_weights="eva")


@pytest.mark.parametrize("mode,chunks,sp", [("column", 2, True), ("row", 1, False), ("row", 1, True),
                                            ("replicated", 1, False)])
def test_dora_declares_the_magnitude_and_when_its_gradient_is_partial(mode, chunks, sp):
    from parallel_adapters.adapters.kinds.dora import DORA, MAGNITUDE
    from parallel_adapters.distributed.sharding import REPLICATED, ShardSpec

    g = LinearGeometry(mode, 16, 24, chunks, GROUP_OF_ONE, 2, 0, sp, False, True, False)
    *lora, magnitude = DORA.tensors(g, {"r": 4, "lora_alpha": 8, "scaling": 2.0})
    assert [d.name for d in lora] == ["lora_A", "lora_B"] and magnitude.name == MAGNITUDE
    assert magnitude.global_shape == (24,)
    assert magnitude.spec == (ShardSpec(dim=0, chunks=chunks) if mode == "column" else REPLICATED)
    # Row: replicated, but the gradient is whole on every rank unless the output is sequence-split.
    assert magnitude.partial_grad == (sp if mode == "row" else None)


def test_unknown_name_and_config_are_refused_naming_what_exists():
    with pytest.raises(ValueError, match=r"unknown adapter kind 'vera'; registered: \['dora', 'ia3', 'loha', 'lokr', 'lora'"):
        kinds.get_kind("vera")
    with pytest.raises(ValueError, match="config must be a parallel_adapters.IA3Config or parallel_adapters.LoHaConfig "
                                         "or parallel_adapters.LoKrConfig or parallel_adapters.LoraConfig, got dict"):
        kinds.kind_for_config({"r": 2})


def test_register_adds_a_kind_and_refuses_a_taken_name(registry):
    toy = registry.register_kind(_Named("toy"))
    assert registry.get_kind("toy") is toy and "toy" in registry.kind_names()
    assert registry.register_kind(toy) is toy  # the same instance again is harmless
    with pytest.raises(ValueError, match="'toy' is already registered"):
        registry.register_kind(_Named("toy"))
    other = registry.register_kind(_Named("toy"), replace=True)
    assert registry.get_kind("toy") is other
    with pytest.raises(ValueError, match="already registered"):
        registry.register_kind(_Named("lora"))


def test_register_refuses_unknown_slots_and_unnamed_kinds(registry):
    with pytest.raises(ValueError, match=r"unknown slot\(s\) \['side_channel'\]"):
        registry.register_kind(_Named("bad", {"row": frozenset({"side_channel"})}))
    with pytest.raises(ValueError, match="named AdapterKind"):
        registry.register_kind(_Named(""))
    with pytest.raises(ValueError, match="named AdapterKind"):
        registry.register_kind(object())


def test_a_kind_without_a_form_for_a_mode_says_so():
    with pytest.raises(ValueError, match="no form for a 'row' layer"):
        _Named("toy").slots("row")


def test_slot_list_is_the_protocol():
    assert SLOTS == ("input_columns", "local_addend", "partial_addend", "input_scale", "output_scale",
                     "weight_delta", "reduction_payload")
    assert all(slots <= set(SLOTS) for slots in LORA.slot_table.values())
    assert WEIGHT_DELTA not in set().union(*LORA.slot_table.values())


@pytest.mark.parametrize("mode,chunks", [("column", 1), ("column", 2), ("row", 1), ("replicated", 1)])
def test_lora_declares_its_tensors_with_the_sharding_rule(mode, chunks):
    decls = LORA.tensors(_geometry(mode, chunks), {"r": 4, "lora_alpha": 8, "scaling": 2.0})
    spec_a, spec_b = lora_factor_specs(mode, chunks)
    assert [(d.name, d.global_shape, d.spec, d.spec_attribute) for d in decls] == [
        ("lora_A", (4, 16), spec_a, "spec_a"), ("lora_B", (24, 4), spec_b, "spec_b")]


def test_lora_settings_and_peft_names():
    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, use_rslora=True, lora_dropout=0.1, seed=5)
    settings = LORA.settings(config, "layers.0.q_proj", _geometry("column"))
    assert settings.hparams == {"r": 2, "lora_alpha": 8, "scaling": pytest.approx(8 / 2 ** 0.5)}
    assert (settings.dropout, settings.seed) == (0.1, 5)
    assert tuple(settings.hparams) == LORA.hyperparameters
    with pytest.raises(ValueError, match=r"LoraConfig.r \(or rank_pattern\) = 20 for module m exceeds"):
        LORA.settings(LoraConfig(r=20), "m", _geometry("row"))
    assert LORA.peft_type == "LORA" and LORA.config_class is LoraConfig
    assert [LORA.peft_key(t) for t in ("lora_A", "lora_B")] == ["lora_A.weight", "lora_B.weight"]
    assert LORA.pattern_fields == ("rank_pattern", "alpha_pattern")
    assert LORA.dropout_stream == "lora-dropout/"  # checkpointed RNG-tracker state names depend on it
