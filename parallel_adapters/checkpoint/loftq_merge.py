"""A LoftQ checkpoint merged into its de-quantised base, offline and pure.

The run trained Q + s B A, Q = dequant(quant(W - B_prev A_prev)) (decompose/loftq.py; B_prev A_prev
is zero for loftq_iter=1), so the merged HF weight is Q + s B A, Q rebuilt per HF module from the
ORIGINAL base weight by the same rule (`quantized_base`).  The checkpoint stores A_prev, B_prev as
`<module>.<tensor>.<adapter>.initial` (adapters/decomposition_state.py).  HF modules split from a
fused Megatron one (q/k/v, gate/up) hold whole rows of it, so their blocks are the run's when
blocks lie inside rows (in_features a multiple of the block); other layouts are refused.  Exact for
loftq_iter=1; for more iterations up to the rounding of B_prev A_prev's matmul on other shapes.

There is no plain-LoRA form for the ORIGINAL base (W - Q is full rank), as in PEFT, which saves
a LoftQ adapter for the quantised base: `export --convert-to-lora` is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from parallel_adapters.adapters.decomposition_state import INITIAL_SUFFIX
from parallel_adapters.checkpoint.hf_adapter import HFModuleAdapter, hf_module_adapters
from parallel_adapters.decompose.loftq import quantized_base
from parallel_adapters.decompose.quantize import BLOCK_SIZE
from parallel_adapters.user_errors import UserError

NEEDS_DEQUANTIZED_BASE = ("a LoftQ adapter applies to the LoftQ-de-quantised base Q, not to the original Hugging Face "
                          "base: load it on a base whose targeted weights are Q (PEFT saves LoftQ adapters for the "
                          "quantised base likewise), or use `merge`, which folds it into Q")


def is_loftq(config: Mapping[str, Any]) -> bool:
    return config.get("init_lora_weights") == "loftq"


@dataclass(frozen=True)
class LoftQModuleAdapter(HFModuleAdapter):
    """An HF module's adapter whose base is first replaced by its LoftQ Q."""

    a_prev: torch.Tensor | None = None
    b_prev: torch.Tensor | None = None
    bits: int = 4
    module: str = ""

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.shape[1] % BLOCK_SIZE and self.b_prev.shape[0] != weight.shape[0]:
            raise UserError(f"merge: {self.module}: LoftQ's blocks of {BLOCK_SIZE} cross the rows of the fused "
                            f"weight it was split from (in_features {weight.shape[1]}): Q cannot be rebuilt per module")
        q = quantized_base(weight, self.a_prev, self.b_prev, self.bits).to(weight.dtype)
        return super().merged_weight(q)


def loftq_module_adapters(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                          hf_config: Mapping[str, Any], adapter_name: str | None = None) -> dict[str, HFModuleAdapter]:
    """HF module -> its adapter merging into Q (module docstring), from full tensors under Megatron names."""
    trained = {n: t for n, t in tensors.items() if not n.endswith(INITIAL_SUFFIX)}
    prev = {n.removesuffix(INITIAL_SUFFIX) + ".weight": t for n, t in tensors.items() if n.endswith(INITIAL_SUFFIX)}
    main = hf_module_adapters(trained, config, hf_config, adapter_name)
    before = hf_module_adapters(prev, config, hf_config, adapter_name)
    bits = (config.get("loftq_config") or {}).get("loftq_bits", 4)
    return {m: LoftQModuleAdapter(a.kind, a.tensors, a.hparams, a.embedding, before[m].tensors["lora_A"],
                                  before[m].tensors["lora_B"], bits, m)
            for m, a in main.items()}
