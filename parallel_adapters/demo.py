"""CPU demo: a tiny Llama-style Megatron GPT at TP=2, LoRA on all four linears, a short fine-tune.

    torchrun --standalone --nproc_per_node 2 -m parallel_adapters.demo [--steps N]

(`bash scripts/demo.sh` runs exactly this inside the project's environment.)
"""
from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from parallel_adapters import LoraConfig, get_adapter_model
from parallel_adapters.mcore import cpu
from parallel_adapters.mcore.compat import destroy_model_parallel, initialize_model_parallel
from parallel_adapters.mcore.gpt import GPTSettings, build_gpt, gpt_logits
from parallel_adapters.train.data import ByteTokenizer, DataParallelBatches, default_corpus_path, load_texts, pack


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = _parse(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    cpu.enable_cpu_mode()
    groups = initialize_model_parallel(tensor_parallel=dist.get_world_size(), pipeline_parallel=1)
    cpu.model_parallel_seed(1234)
    rank0 = dist.get_rank() == 0
    tokenizer = ByteTokenizer()
    settings = GPTSettings(num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4,
                           num_query_groups=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=args.seq_len)
    model = get_adapter_model(build_gpt(settings), LoraConfig(r=16, lora_alpha=32))
    if rank0:
        print(f"TP={groups.tp_size} tiny Llama-style GPT, LoRA r=16 on linear_qkv/proj/fc1/fc2")
        model.print_trainable_parameters()
    samples = pack([tokenizer.encode(t) for t in load_texts([default_corpus_path()])], args.seq_len, tokenizer.eos_id)
    batches = DataParallelBatches(samples, args.micro_batch, groups.dp_rank, groups.dp_size, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses, start = [], time.perf_counter()
    bar = tqdm(range(args.steps), disable=not rank0, desc="fine-tune", unit="step")
    for _ in bar:
        batch = batches.next_batch()
        logits = gpt_logits(model.model, batch["input_ids"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        optimizer.zero_grad()
        loss.backward()
        model.finalize_grads()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    elapsed = time.perf_counter() - start
    if rank0:
        tokens = args.steps * args.micro_batch * groups.dp_size * args.seq_len
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps "
              f"({tokens / elapsed:,.0f} tokens/s on {dist.get_world_size()} CPU ranks)")
    destroy_model_parallel()
    dist.destroy_process_group()
    if losses[-1] >= losses[0]:
        raise SystemExit("demo: the loss did not fall")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
