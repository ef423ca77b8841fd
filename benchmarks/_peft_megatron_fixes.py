"""The smallest monkey-patches that make PEFT 0.21.2's `LoraParallelLinear` run on megatron-core.

Benchmark-only (never imported by the library).  Each fix is the narrowest change that gets past
one bug of `peft/tuners/lora/tp_layer.py`; none changes PEFT's math or communication pattern.

1. `KeyError: 'fan_in_fan_out'` in `dispatch_megatron` (tp_layer.py:347): since peft 0.19
   `_create_and_replace` no longer passes `fan_in_fan_out` in kwargs.  `LoraModel._create_new_module`
   looks `dispatch_megatron` up in `peft.tuners.lora.model`'s globals at call time, so that name is
   wrapped to `kwargs.setdefault("fan_in_fan_out", config.fan_in_fan_out)`.
2. `KeyError: 'default'` on `self.lora_bias[adapter_name]` (layer.py): `LoraParallelLinear.update_layer`
   never sets `lora_bias`.  The wrapped `update_layer` sets `lora_bias[adapter] = False` first
   (LoraParallelLinear rejects lora_bias=True anyway).
3. `TypeError: can't multiply sequence by non-int of type 'float'` in `LoraParallelLinear.forward`
   (tp_layer.py:215): the megatron `RowParallelLinear` lora_A / `ColumnParallelLinear` lora_B return
   `(output, bias)` tuples that PEFT never unpacks.  After `update_layer`, those two instances get
   an instance-level `forward` that returns `out[0]` (parameter names and `.weight` unchanged).

Also required (configuration, not a patch): `megatron_config` must have
`use_cpu_initialization=True` on a CPU-only torch, or the LoRA layers allocate on
`torch.cuda.current_device()`; and PEFT mutates the config it is given (`params_dtype`), so
pass it a copy.
"""
from __future__ import annotations

import types
from typing import Any

FIXES = (
    "1: wrap peft.tuners.lora.model.dispatch_megatron so kwargs get fan_in_fan_out "
    "(KeyError: 'fan_in_fan_out' at tp_layer.py dispatch_megatron)",
    "2: set lora_bias[adapter] = False before LoraParallelLinear.update_layer "
    "(KeyError: 'default' on self.lora_bias[adapter_name])",
    "3: megatron lora_A (RowParallelLinear) / lora_B (ColumnParallelLinear) instances get a forward "
    "returning out[0] of the (output, bias) tuple "
    "(TypeError: can't multiply sequence by non-int of type 'float' in LoraParallelLinear.forward)",
)
CONFIG_NOTES = (
    "megatron_config = a shallow copy of the model's TransformerConfig "
    "(use_cpu_initialization=True; PEFT sets params_dtype on it)",
)

_APPLIED: set[int] = set()


def _first_of_tuple_forward(module: Any) -> None:
    cls_forward = type(module).forward

    def forward(self, *args: Any, **kwargs: Any):
        out = cls_forward(self, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    module.forward = types.MethodType(forward, module)


def _fix_fan_in_fan_out() -> None:
    import peft.tuners.lora.model as lora_model

    original = lora_model.dispatch_megatron

    def dispatch_megatron(target, adapter_name, config, **kwargs):
        kwargs.setdefault("fan_in_fan_out", config.fan_in_fan_out)
        return original(target, adapter_name, config=config, **kwargs)

    lora_model.dispatch_megatron = dispatch_megatron


def _wrap_update_layer(before=None, after=None) -> None:
    import peft.tuners.lora.tp_layer as tp_layer

    original = tp_layer.LoraParallelLinear.update_layer

    def update_layer(self, adapter_name, *args, **kwargs):
        if before is not None:
            before(self, adapter_name)
        original(self, adapter_name, *args, **kwargs)
        if after is not None:
            after(self, adapter_name)

    tp_layer.LoraParallelLinear.update_layer = update_layer


def _set_lora_bias(layer: Any, adapter_name: str) -> None:
    layer.lora_bias[adapter_name] = False


def _unpack_parallel_factors(layer: Any, adapter_name: str) -> None:
    parallel = (layer.backend.ColumnParallelLinear, layer.backend.RowParallelLinear)
    for table in (layer.lora_A, layer.lora_B):
        if isinstance(table[adapter_name], parallel):
            _first_of_tuple_forward(table[adapter_name])


def apply_fix(number: int) -> str:
    """Apply fix 1, 2 or 3 (idempotent); returns its description."""
    if number not in _APPLIED:
        if number == 1:
            _fix_fan_in_fan_out()
        elif number == 2:
            _wrap_update_layer(before=_set_lora_bias)
        elif number == 3:
            _wrap_update_layer(after=_unpack_parallel_factors)
        else:
            raise ValueError(f"no PEFT fix number {number}")
        _APPLIED.add(number)
    return FIXES[number - 1]


def apply_fixes() -> tuple[str, ...]:
    """Apply fixes 1-3 (idempotent); returns their descriptions."""
    return tuple(apply_fix(n) for n in (1, 2, 3))
