"""The whole pipeline on a CPU, on two local ranks at TP=2 (the README's first command):

    torchrun --standalone --nproc_per_node 2 -m parallel_adapters.demo [key=value ...]

1. write a tiny Llama-style Hugging Face checkpoint (random weights, no download);
2. import it into Megatron at TP=2 with sequence parallelism, initialise LoRA with EVA;
3. fine-tune on the corpus that ships with the package, saving sharded checkpoints;
4. export the adapter in PEFT format and check that PEFT + transformers reproduce the logits.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel_adapters.checkpoint.outputs import mark_output, output_command
from parallel_adapters.distributed.agreement import on_rank0
from parallel_adapters.mcore import cpu
from parallel_adapters.mcore.compat import destroy_model_parallel, initialize_model_parallel
from parallel_adapters.mcore.gpt import GPTSettings, build_gpt
from parallel_adapters.mcore.hf_bridge import export_hf_checkpoint
from parallel_adapters.train.data import ByteTokenizer
from parallel_adapters.train.run_config import load_run_config
from parallel_adapters.train.process_group import init_distributed
from parallel_adapters.train.runner import DEFAULT_TIMEOUT_S, TrainResult, run_training
from parallel_adapters.user_errors import UserError, run_command

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
RUN_DIR = Path("runs/demo")
BASE = GPTSettings(num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, num_query_groups=2,
                   vocab_size=ByteTokenizer.vocab_size, max_position_embeddings=128, seed=1234)


def write_base_checkpoint(out_dir: Path) -> Path:
    """A random Llama-style model written as HF safetensors + config.json (collective)."""
    if not torch.cuda.is_available():
        cpu.enable_cpu_mode()
    groups = initialize_model_parallel(dist.get_world_size(), 1)
    export_hf_checkpoint(build_gpt(BASE), out_dir, groups)
    destroy_model_parallel()
    return out_dir


def summary(result: TrainResult, base_dir: Path, seconds: float) -> str:
    first, last = result.losses[0], result.losses[-1]
    rows = [
        ("base model (HF safetensors)", str(base_dir)),
        ("EVA initialisation", f"{result.eva_steps} steps"),
        ("loss, first -> last step", f"{first:.3f} -> {last:.3f} ({100 * (first - last) / first:.1f}% lower)"),
        ("steps, throughput", f"{result.final_step}, {result.tokens_per_s:,.0f} tokens/s"),
        ("sharded checkpoint", str(result.last_checkpoint)),
        ("PEFT adapter", str(Path(result.export_dir).absolute())),
        ("PEFT + transformers vs Megatron", f"max |logit diff| = {result.peft_max_logit_diff:.1e} (limit 1e-4)"),
        ("wall time", f"{seconds:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "demo summary", "-" * 60] + [f"{k.ljust(width)}  {v}" for k, v in rows])


def clear_previous_demo(run_dir: Path) -> None:
    """Start from nothing: remove `run_dir` if an earlier demo made it; refuse anything else there."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if output_command(run_dir) != "demo":
            raise UserError(f"demo: {run_dir} exists and was not made by the demo: move it away first")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_output(run_dir, "demo")


def main(argv: list[str] | None = None) -> None:
    run_command("demo", lambda: _demo(argv))


def _demo(argv: list[str] | None) -> None:
    start = time.perf_counter()
    torch.set_num_threads(1)
    init_distributed(DEFAULT_TIMEOUT_S)
    on_rank0(lambda: clear_previous_demo(RUN_DIR.absolute()), "preparing runs/demo")
    base_dir = (RUN_DIR / "hf-base").absolute()
    write_base_checkpoint(base_dir)
    overrides = [f"model.hf_checkpoint={base_dir}", *(argv if argv is not None else sys.argv[1:])]
    result = run_training(load_run_config(CONFIG, overrides), resume=False)
    rank0 = dist.get_rank() == 0
    if rank0:
        print(summary(result, base_dir, time.perf_counter() - start))
    dist.destroy_process_group()
    if result.peft_max_logit_diff is None or result.peft_max_logit_diff > 1e-4:
        raise SystemExit("demo: PEFT did not reproduce the Megatron logits")
    if result.losses[-1] > 0.9 * result.losses[0]:
        raise SystemExit("demo: the loss did not drop clearly")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
