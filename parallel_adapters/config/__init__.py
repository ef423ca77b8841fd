"""Typed adapter configuration, in PEFT's vocabulary (`LoraConfig`, `EvaConfig`, `IA3Config`,
`LoHaConfig`, `LoKrConfig`, `PromptTuningConfig`, `PromptEncoderConfig`,
`PrefixTuningConfig`).

Field names and defaults follow Hugging Face PEFT so that a PEFT user is at home and so that
`adapter_config.json` round-trips.  Validation raises ValueError naming the field.  Configs are
never mutated after construction by this package: helpers return modified copies.
"""
from parallel_adapters.config.common import (  # noqa: F401
    MEGATRON_LINEAR_TARGETS, TargetModules, lora_scaling, pattern_key_matches, pattern_value,
)
from parallel_adapters.config.family import IA3_FUSED_PARTS, IA3Config, LoHaConfig, LoKrConfig  # noqa: F401
from parallel_adapters.config.lora import CordaConfig, EvaConfig, LoraConfig, decomposition_init  # noqa: F401
from parallel_adapters.config.lora import LoftQConfig  # noqa: F401
from parallel_adapters.config.prompt import (  # noqa: F401
    ENCODER_TYPES, PROMPT_TUNING_INITS, PromptEncoderConfig, PromptTuningConfig,
)
from parallel_adapters.config.prefix import PREFIX_INIT_WEIGHTS, PrefixTuningConfig  # noqa: F401
