"""After training: the PEFT export of the final checkpoint, and PEFT's check of the Megatron logits."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from parallel_adapters.adapters.model import AdapterModel
from parallel_adapters.checkpoint.outputs import mark_output
from parallel_adapters.distributed import collectives as C
from parallel_adapters.distributed.agreement import on_rank0
from parallel_adapters.train.loop import compute_device
from parallel_adapters.train.run_directory import HF_BASE_SUFFIX



def export_adapter(model: AdapterModel, checkpoint: Path | None, peft_dir: str, hf_dir: str | None,
                   overwrite: bool = False) -> str:
    """World rank 0 writes the PEFT adapter from the final checkpoint (an offline, single-process
    step); the others wait, so the run ends only when the export exists.  The HF config is the
    checkpoint's, or one derived from the Megatron model."""
    from parallel_adapters.checkpoint.export import export_peft_from_checkpoint
    from parallel_adapters.config import decomposition_init
    from parallel_adapters.mcore.hf_bridge import hf_config_from_model

    def export() -> str:
        if checkpoint is None:
            raise ValueError("export.peft_dir: no checkpoint was written by this run")
        hf_config = hf_dir or hf_config_from_model(model.model)
        convert = decomposition_init(getattr(model.peft_config[model.active_adapter], "init_lora_weights", None))
        convert = convert is not None and convert[0] != "loftq"  # LoftQ: no conversion exists (it warns instead)
        return str(export_peft_from_checkpoint(checkpoint, peft_dir, hf_config, overwrite=overwrite,
                                               convert_to_lora=convert))  # PiSSA/OLoRA: original base

    return on_rank0(export, f"export to {peft_dir}")


def verify_with_peft(model: AdapterModel, engine: Any, input_ids: torch.Tensor, peft_dir: str,
                     hf_dir: str | None, vocab_size: int) -> tuple[float, float]:
    """export.verify_with_peft: PEFT (the exported adapter on the Hugging Face base) must reproduce
    the Megatron logits on `input_ids`; returns the max difference and the limit it was held to.  Without a HF checkpoint the
    base is first written as one next to the adapter (`<peft_dir>-hf-base`).  Collective."""
    from parallel_adapters.interop.peft_check import verify_peft_reproduces
    from parallel_adapters.mcore.gpt import gpt_logits
    from parallel_adapters.mcore.hf_bridge import export_hf_checkpoint

    g = model.groups
    if hf_dir is None:
        if getattr(engine, "stage", 0) == 3:
            raise ValueError("export.verify_with_peft under ZeRO-3 needs model.hf_checkpoint (the base "
                             "weights are partitioned and cannot be exported from the run)")
        hf_dir = export_hf_checkpoint(model.model, Path(peft_dir).with_name(Path(peft_dir).name + HF_BASE_SUFFIX), g)
        if C.group_rank(None) == 0:
            mark_output(Path(hf_dir), "hf-base")
    device_ids, was_training = input_ids.to(compute_device()), model.training
    model.eval()
    with torch.no_grad():
        if g.pp_size == 1:  # through the engine: ZeRO-3 gathers its partitioned weights in forward
            logits = engine.forward_module(device_ids, None, None, runtime_gather_output=True)[..., :vocab_size]
        else:
            logits = gpt_logits(model.model, device_ids)
    model.train(was_training)
    mine = logits.cpu() if (g.is_last_stage and g.tp_rank == 0 and g.dp_rank == 0) else None
    megatron = next(x for x in C.all_gather_objects(mine, None) if x is not None)
    atol = peft_tolerance(megatron, {p.dtype for p in model.model.parameters() if not p.requires_grad})
    diff = on_rank0(lambda: verify_peft_reproduces(hf_dir, peft_dir, input_ids, megatron, atol), "verify_with_peft")
    return diff, atol


def peft_tolerance(megatron_logits: torch.Tensor, base_dtypes: set) -> float:
    """How far PEFT (float32) may be from the Megatron logits.  On a float32 base 1e-4, or 1e-5 of
    the largest logit where that is more: float32 rounding through many layers grows with the
    logits' scale (a pretrained model's reach 30-40; SmolLM2-135M at TP=3 differs from PEFT by up to
    9e-5 on logits up to 38), while a layout error (a wrong split or permutation) moves them by
    whole units.  On a bfloat16 base (8-bit mantissa, rounding at every layer) 5% of the largest
    logit, which a layout error still exceeds many times over."""
    scale = megatron_logits.float().abs().max().item()
    if base_dtypes <= {torch.float32, torch.float64}:
        return max(1e-4, 1e-5 * scale)
    return 0.05 * max(1.0, scale)
