"""`parallel-adapters evaluate`: the adapted model's logits and perplexity for given token ids.

    torchrun --nproc_per_node 2 -m parallel_adapters evaluate configs/tiny.yaml \
        --checkpoint runs/tiny/checkpoints/step-000040 --tokens ids.txt --out logits.safetensors

The token file holds one sequence per line, as whitespace-separated ids.  The output holds
`logits.<i>` [len_i, vocab] (fp32) for sequence i and `perplexity` (a scalar tensor, also in the
file's metadata): exp of the mean next-token cross entropy over all sequences.  Any TP/PP layout
can read any checkpoint (adapters are resharded on load).

A prompt-learning checkpoint (prompt tuning, P-tuning): `logits.<i>` is [n + len_i, vocab], the
virtual positions first, exactly what `PeftModel(input_ids=...).logits` returns (the real tokens'
logits are rows n..); the metadata's `virtual_tokens` says n.  The perplexity is PEFT's loss with
labels = the sequence: the last virtual position predicts the first token, so len_i predictions.
"""
from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open

from parallel_adapters.checkpoint.files import write_safetensors
from parallel_adapters.checkpoint.layout import TMP_MARKER
from parallel_adapters.checkpoint.outputs import check_output_file, checkpoint_inputs, make_parents, remove_created
from parallel_adapters.train.run_config import RunConfig
from parallel_adapters.user_errors import alike_on_every_rank
from parallel_adapters.train.process_group import init_distributed
from parallel_adapters.train.runner import DEFAULT_TIMEOUT_S, build_model, saved_adapter_config
from parallel_adapters.train.validate import check_parallel_layout, validate_run_config


def read_token_file(path: str | Path) -> list[torch.Tensor]:
    """One LongTensor per non-empty line; ValueError naming the file and line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--tokens file {str(path)!r} does not exist")
    sequences = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--tokens file {path}: not UTF-8 text (byte {exc.start}); expected token ids") from None
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids = [int(tok) for tok in line.split()]
        except ValueError:
            raise ValueError(f"{path}:{line_no}: token ids must be integers") from None
        if min(ids) < 0:
            raise ValueError(f"{path}:{line_no}: token id {min(ids)} is negative")
        if len(ids) < 2:
            raise ValueError(f"{path}:{line_no}: a sequence needs at least 2 tokens for a perplexity")
        sequences.append(torch.tensor(ids, dtype=torch.long))
    if not sequences:
        raise ValueError(f"{path}: no token sequences")
    return sequences


def run_evaluation(config: RunConfig, checkpoint: str | Path, tokens: str | Path, out: str | Path,
                   overwrite: bool = False) -> float | None:
    """Collective over the torchrun world; returns the perplexity on the rank that writes `out`.
    `out` is checked before anything runs: never an input (checkpoint, its run directory, the token
    file, the HF base), never an existing file other than a previous evaluate output (and that one
    only with `overwrite`)."""
    from parallel_adapters.checkpoint.adapter_io import load_checkpoint
    from parallel_adapters.mcore import compat, cpu, schedule
    from parallel_adapters.mcore.gpt import gpt_logits

    sequences, out = alike_on_every_rank(lambda: _check_inputs(config, checkpoint, tokens, out, overwrite))
    checkpoint = Path(checkpoint)
    created = init_distributed(DEFAULT_TIMEOUT_S)
    try:
        layout = check_parallel_layout(dist.get_world_size(), config)
        if not torch.cuda.is_available():
            cpu.enable_cpu_mode()
        groups = compat.initialize_model_parallel(layout.tensor, layout.pipeline)
        schedule.seed_model_parallel_rngs(config.seed)
        model, settings = build_model(config, groups, saved_adapter_config(checkpoint), dist.get_rank() == 0)
        load_checkpoint(model, checkpoint, restore_rng=False)
        model.eval()
        too_big = [int(s.max()) for s in sequences if int(s.max()) >= settings.vocab_size]
        if too_big:
            raise ValueError(f"{tokens}: token id {max(too_big)} is outside the vocabulary ({settings.vocab_size})")
        with torch.no_grad():
            logits = [gpt_logits(model.model, seq.unsqueeze(0)) for seq in sequences]
        writer = groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0
        return _write(logits, sequences, out, int(getattr(model.model, "prepended_tokens", 0))) if writer else None
    finally:
        compat.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


WRITTEN_BY = "parallel_adapters"


def is_evaluate_output(path: Path) -> bool:
    """Whether `path` is a logits file an earlier `evaluate` wrote (its safetensors metadata says so)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get(WRITTEN_BY) == "evaluate"
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def _check_inputs(config: RunConfig, checkpoint: str | Path, tokens: str | Path, out: str | Path,
                  overwrite: bool) -> tuple[list[torch.Tensor], Path]:
    """Before any process group: the config, the token file and the output path (a typo fails fast)."""
    validate_run_config(config)
    sequences = read_token_file(tokens)
    inputs = [*checkpoint_inputs(checkpoint), ("--tokens file", tokens),
              ("model.hf_checkpoint", config.model.hf_checkpoint)]
    return sequences, check_output_file(out, "evaluate", inputs, overwrite, is_ours=is_evaluate_output)


def _write(logits: list[torch.Tensor], sequences: list[torch.Tensor], out: str | Path, virtual: int = 0) -> float:
    """`virtual` (n) > 0: the logits hold n virtual positions first; position n - 1 predicts seq[0]."""
    total, count, tensors = 0.0, 0, {}
    for i, (lg, seq) in enumerate(zip(logits, sequences)):
        lg = lg[0].float()
        first = max(virtual - 1, 0)  # the position that predicts the first target
        targets = seq if virtual else seq[1:]
        total += F.cross_entropy(lg[first:-1].double(), targets, reduction="sum").item()
        count += len(targets)
        tensors[f"logits.{i}"] = lg.contiguous()
    perplexity = math.exp(total / count)
    tensors["perplexity"] = torch.tensor(perplexity, dtype=torch.float64)
    metadata = {"perplexity": repr(perplexity), "sequences": str(len(sequences)), WRITTEN_BY: "evaluate"}
    if virtual:
        metadata["virtual_tokens"] = str(virtual)
    out = Path(out)
    created = make_parents(out)
    tmp = out.with_name(f".{out.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")
    try:
        write_safetensors(tmp, tensors, metadata, checksum=False)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_created(created)
        raise
    print(f"perplexity {perplexity:.4f} over {count} predicted tokens; logits written to {out}")
    return perplexity
