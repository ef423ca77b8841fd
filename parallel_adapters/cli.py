"""`parallel-adapters` (also `python -m parallel_adapters`): thin command-line entry points.

    torchrun --nproc_per_node 2 -m parallel_adapters train configs/tiny.yaml optim.lr=1e-3
    parallel-adapters inspect runs/tiny/ckpt/step-40
    parallel-adapters verify runs/tiny/ckpt/step-40
    parallel-adapters consolidate runs/tiny/ckpt/step-40 --out full/ [--tp 4]
    parallel-adapters export runs/tiny/ckpt/step-40 --format peft --out peft_adapter/ --hf-config HF_DIR
    parallel-adapters merge runs/tiny/ckpt/step-40 --base HF_DIR --out merged/
    torchrun ... -m parallel_adapters evaluate configs/tiny.yaml --checkpoint CKPT --tokens ids.txt --out logits.safetensors

The offline commands (inspect, verify, consolidate, export, merge) run on one process, with no
torch.distributed and no GPU.  Every command imports only what it needs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence


def _inspect(args: argparse.Namespace) -> None:
    from parallel_adapters.checkpoint.reader import CheckpointReader

    with CheckpointReader(args.checkpoint) as reader:
        config = reader.config()
        rows = []
        for name, info in sorted(reader.tensors.items()):
            layout = "replicated" if info.spec.dim is None else f"dim {info.spec.dim}" + (
                f" x{info.spec.chunks} chunks" if info.spec.chunks > 1 else "")
            numel = 1
            for size in info.global_shape:
                numel *= size
            rows.append((name, "x".join(map(str, info.global_shape)), str(info.dtype).replace("torch.", ""),
                         layout, f"{numel * info.dtype.itemsize / 1024:.1f}"))
        print(f"{reader.directory}: tp={reader.tp_size} pp={reader.pp_size} dp={reader.dp_size}, "
              f"r={config.get('r')} lora_alpha={config.get('lora_alpha')}, {len(rows)} tensors")
        _print_table(("tensor", "global shape", "dtype", "TP layout", "KiB"), rows)
        total = sum(record["bytes"] for record in reader.index["files"].values())
        print(f"{len(reader.index['files'])} files, {total / 2**20:.2f} MiB on disk")


def _verify(args: argparse.Namespace) -> None:
    from parallel_adapters.checkpoint.reader import CheckpointReader

    with CheckpointReader(args.checkpoint) as reader:
        nbytes = reader.verify_all()
        print(f"{reader.directory}: ok ({len(reader.index['files'])} files, {nbytes / 2**20:.2f} MiB, "
              f"{len(reader.tensors)} tensors: sizes, sha256 and safetensors headers match index.json)")


def _consolidate(args: argparse.Namespace) -> None:
    from parallel_adapters.checkpoint.consolidate import reshard

    out = reshard(args.checkpoint, args.out, args.tp, progress=True)
    print(f"wrote {out} (tp={args.tp}, full tensors with Megatron names)" if args.tp == 1 else
          f"wrote {out} (resharded to tp={args.tp})")


def _export(args: argparse.Namespace) -> None:
    import torch

    from parallel_adapters.checkpoint.export import export_peft_from_checkpoint

    if args.format != "peft":
        raise SystemExit(f"export: unknown --format {args.format!r} (supported: peft)")
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    out = export_peft_from_checkpoint(args.checkpoint, args.out, args.hf_config, dtype=dtype)
    print(f"wrote PEFT adapter to {out}" + (f" ({args.dtype})" if dtype is not None else ""))


def _merge(args: argparse.Namespace) -> None:
    from parallel_adapters.checkpoint.merge import merge_into_hf

    out = merge_into_hf(args.checkpoint, args.base, args.out)
    print(f"wrote merged Hugging Face model to {out}")


def _train(args: argparse.Namespace) -> None:
    from parallel_adapters.train.runner import main as train_main

    train_main(["--config", args.config, *args.rest])


def _evaluate(args: argparse.Namespace) -> None:
    from parallel_adapters.train.evaluate import run_evaluation
    from parallel_adapters.train.run_config import load_run_config

    config = load_run_config(args.config, args.overrides)
    run_evaluation(config, args.checkpoint, args.tokens, args.out)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in (header, ["-" * w for w in widths], *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallel-adapters", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = command("train", _train, "train adapters (run under torchrun)")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="dotted key=value overrides, and --resume / --resume-from DIR / --no-resume / --stop-at N")

    p = command("evaluate", _evaluate, "write the adapted model's logits and perplexity for given token ids")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokens", required=True, help="text file: one sequence of whitespace-separated token ids per line")
    p.add_argument("--out", required=True, help="output .safetensors with logits (and perplexity in its metadata)")

    p = command("inspect", _inspect, "print the tensors, shapes, ranks and shard layout of a checkpoint")
    p.add_argument("checkpoint")

    p = command("verify", _verify, "check every file of a checkpoint against index.json (size, sha256, headers)")
    p.add_argument("checkpoint")

    p = command("consolidate", _consolidate, "full tensors with Megatron names (--tp 1), or reshard to --tp N")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)

    p = command("export", _export, "export a checkpoint as a PEFT adapter (adapter_model.safetensors)")
    p.add_argument("checkpoint")
    p.add_argument("--format", default="peft", choices=["peft"])
    p.add_argument("--out", required=True)
    p.add_argument("--hf-config", required=True,
                   help="the base model's HF directory or config.json (names and q/k/v split come from it)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the factors (default: as trained, float32)")

    p = command("merge", _merge, "fold the adapter into a Hugging Face base model (streamed)")
    p.add_argument("checkpoint")
    p.add_argument("--base", required=True, help="the base model's HF directory")
    p.add_argument("--out", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ValueError as exc:  # user errors (config, checkpoint): one clear line, no traceback
        print(f"parallel-adapters {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
