"""`parallel-adapters` (also `python -m parallel_adapters`): thin command-line entry points.

    torchrun --nproc_per_node 2 -m parallel_adapters train configs/tiny.yaml optim.lr=1e-3
    parallel-adapters inspect runs/tiny/ckpt                  # the run's `latest` step
    parallel-adapters verify runs/tiny/ckpt --step 40         # or a step: runs/tiny/ckpt/step-000040
    parallel-adapters consolidate runs/tiny/ckpt --out full/ [--tp 4] [--expert-tp 2]
    parallel-adapters export runs/tiny/ckpt --out peft_adapter/ [--hf-config HF_DIR]
    parallel-adapters merge runs/tiny/ckpt --out merged/ [--base HF_DIR]
    torchrun ... -m parallel_adapters evaluate configs/tiny.yaml --checkpoint CKPT --tokens ids.txt --out logits.safetensors

The offline commands (inspect, verify, consolidate, export, merge) run on one process, with no
torch.distributed and no GPU.  Each takes a run's checkpoint directory (`checkpoint.directory`:
its `latest` step, or the one `--step N` names) or a step directory, and says on stderr which
step it chose.  A checkpoint records its base model (hf_config.json, base_model_name_or_path), so
export needs `--hf-config` and merge `--base` only to override it, for an older checkpoint, or
(merge) for a base built from GPT settings.  Every command imports only what it needs.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

from parallel_adapters.train.cli_args import add_train_arguments
from parallel_adapters.user_errors import run_command


def _checkpoint(args: argparse.Namespace) -> Path:
    """The step directory the command works on (see checkpoint/locate.py); says which when chosen."""
    from parallel_adapters.checkpoint.locate import locate_checkpoint

    found = locate_checkpoint(args.checkpoint, args.step)
    if found.chosen_by is not None:
        print(f"{args.command}: {found.describe()}", file=sys.stderr, flush=True)
    return found.directory


def _inspect(args: argparse.Namespace) -> None:
    from parallel_adapters.checkpoint.reader import CheckpointReader

    with CheckpointReader(_checkpoint(args)) as reader:
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
        print(f"base model: {_base_summary(reader)}")
        _print_table(("tensor", "global shape", "dtype", "TP layout", "KiB"), rows)
        total = sum(record["bytes"] for record in reader.index["files"].values())
        print(f"{len(reader.index['files'])} files, {total / 2**20:.2f} MiB on disk")


def _verify(args: argparse.Namespace) -> None:
    from parallel_adapters.checkpoint.finite import ALLOW_FLAG, nonfinite_config_keys, nonfinite_count
    from parallel_adapters.checkpoint.reader import CheckpointReader
    from parallel_adapters.user_errors import UserError

    with CheckpointReader(_checkpoint(args)) as reader:
        nbytes = reader.verify_all()
        bad = [f"{name} ({count} of {math.prod(reader.tensors[name].global_shape)})" for name in sorted(reader.tensors)
               if (count := nonfinite_count(reader.read_full(name)))]
        bad += [f"adapter_config.json: {key}" for key in nonfinite_config_keys(reader.config())]
        if bad:
            raise UserError(f"{reader.directory}: files match index.json, but {len(bad)} value(s) are non-finite "
                            f"(NaN or inf): {', '.join(bad)}; export and merge refuse them "
                            f"(unless {ALLOW_FLAG})")
        print(f"{reader.directory}: ok ({len(reader.index['files'])} files, {nbytes / 2**20:.2f} MiB, "
              f"{len(reader.tensors)} tensors: sizes, sha256 and safetensors headers match index.json, "
              "every value finite)")


def _consolidate(args: argparse.Namespace) -> None:
    from parallel_adapters.checkpoint.consolidate import reshard

    out = reshard(_checkpoint(args), args.out, args.tp, progress=True, overwrite=args.overwrite,
                  expert_tp_size=args.expert_tp)
    etp = "" if args.expert_tp in (None, args.tp) else f", routed experts' adapters at expert-tp={args.expert_tp}"
    print(f"wrote {out} (tp={args.tp}, full tensors with Megatron names{etp})" if args.tp == 1 else
          f"wrote {out} (resharded to tp={args.tp}{etp})")


def _export(args: argparse.Namespace) -> None:
    import torch

    from parallel_adapters.checkpoint.export import export_peft_from_checkpoint

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    out = export_peft_from_checkpoint(_checkpoint(args), args.out, args.hf_config, dtype=dtype,
                                      overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite,
                                      convert_to_lora=args.convert_to_lora)
    print(f"wrote PEFT adapter to {out}" + (f" ({args.dtype})" if dtype is not None else "")
          + (" (converted to a rank-2r LoRA on the original base)" if args.convert_to_lora else ""))


def _merge(args: argparse.Namespace) -> None:
    from parallel_adapters.checkpoint.export import ADAPTER_WEIGHTS_FILE
    from parallel_adapters.checkpoint.merge import merge_into_hf

    peft_dir = args.step is None and (Path(args.checkpoint) / ADAPTER_WEIGHTS_FILE).is_file()
    source = Path(args.checkpoint) if peft_dir else _checkpoint(args)
    out = merge_into_hf(source, args.base, args.out, overwrite=args.overwrite,
                        allow_nonfinite=args.allow_nonfinite, safe_merge=args.safe_merge)
    print(f"wrote merged Hugging Face model to {out}")


def _train(args: argparse.Namespace) -> None:
    from parallel_adapters.train.runner import train_from_args

    train_from_args(args)


def _evaluate(args: argparse.Namespace) -> None:
    from parallel_adapters.train.evaluate import run_evaluation
    from parallel_adapters.train.run_config import load_run_config

    from parallel_adapters.user_errors import alike_on_every_rank

    config = alike_on_every_rank(lambda: load_run_config(args.config, args.overrides))
    run_evaluation(config, args.checkpoint, args.tokens, args.out, overwrite=args.overwrite)


def _base_summary(reader: object) -> str:
    from parallel_adapters.checkpoint.base_model import recorded_base_path
    from parallel_adapters.checkpoint.layout import HF_CONFIG_FILE

    path, has_config = recorded_base_path(reader), HF_CONFIG_FILE in reader.index["files"]
    if path is not None:
        return f"{path} (its config.json recorded as {HF_CONFIG_FILE})" if has_config else path
    if has_config:
        return f"built from GPT settings (an HF config.json for it recorded as {HF_CONFIG_FILE})"
    return "not recorded (export needs --hf-config, merge --base)"


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in (header, ["-" * w for w in widths], *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallel-adapters", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # name -> its parser (train/evaluate re-parse with intermixed overrides)

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = command("train", _train, "train adapters (run under torchrun)")
    add_train_arguments(p)

    p = command("evaluate", _evaluate, "write the adapted model's logits and perplexity for given token ids")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokens", required=True, help="text file: one sequence of whitespace-separated token ids per line")
    p.add_argument("--out", required=True, help="output .safetensors with logits (and perplexity in its metadata)")
    _overwrite(p, "a previous evaluate output file")

    p = command("inspect", _inspect, "print the tensors, shapes, ranks and shard layout of a checkpoint")
    _checkpoint_arguments(p)

    p = command("verify", _verify, "check every file of a checkpoint against index.json (size, sha256, headers)")
    _checkpoint_arguments(p)

    p = command("consolidate", _consolidate, "full tensors with Megatron names (--tp 1), or reshard to --tp N")
    _checkpoint_arguments(p)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--expert-tp", type=int, default=None,
                   help="split the routed MoE experts' adapters over this many expert-TP ranks (default: --tp)")
    _overwrite(p, "a previous consolidate output")

    p = command("export", _export, "export a checkpoint as a PEFT adapter (adapter_model.safetensors)")
    _checkpoint_arguments(p)
    p.add_argument("--format", default="peft", choices=["peft"])
    p.add_argument("--out", required=True)
    p.add_argument("--hf-config", default=None,
                   help="the base model's HF directory or config.json (names and q/k/v split come from it; "
                        "default: the one the checkpoint records)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the factors (default: as trained, float32)")
    p.add_argument("--convert-to-lora", action="store_true",
                   help="PiSSA/OLoRA: write the rank-2r LoRA [A; A0], [B, -B0] that loads on the ORIGINAL base "
                        "(PEFT's path_initial_model_for_weight_conversion); required for such checkpoints; refused "
                        "for LoftQ (no low-rank form on the original base exists)")
    _overwrite(p, "a previous export")
    _allow_nonfinite(p)

    p = command("merge", _merge, "fold the adapter into a Hugging Face base model (streamed)")
    _checkpoint_arguments(p, peft=True)
    p.add_argument("--base", default=None,
                   help="the base model's HF directory (default: the one the checkpoint records)")
    p.add_argument("--out", required=True)
    p.add_argument("--safe-merge", action="store_true",
                   help="check every merged weight is finite before writing it (as PEFT's safe_merge)")
    _overwrite(p, "a previous merge output")
    _allow_nonfinite(p)
    return parser


def _checkpoint_arguments(p: argparse.ArgumentParser, peft: bool = False) -> None:
    p.add_argument("checkpoint", help="a run's checkpoint directory (its `latest` step, or --step N) or a step "
                                      "directory" + (", or an exported PEFT adapter directory" if peft else ""))
    p.add_argument("--step", type=int, default=None,
                   help="with a run's checkpoint directory: the step-NNNNNN checkpoint of step N")


def _overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} (nothing else is ever replaced)")


def _allow_nonfinite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write NaN/inf factors or config values instead of refusing them")


_INTERMIXED = ("train", "evaluate")
"""Commands whose key=value overrides may stand anywhere among their options."""


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in _INTERMIXED:
        args = parser.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    run_command(args.command, lambda: args.handler(args))


if __name__ == "__main__":
    main()
