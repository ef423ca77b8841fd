"""The `train` command's arguments, shared by `-m parallel_adapters train CONFIG` (`parallel-adapters
train`) and `-m parallel_adapters.train.runner --config CONFIG`.

Light on purpose (argparse only): the command line is parsed before torch or megatron is imported.
"""
from __future__ import annotations

import argparse


def add_train_arguments(parser: argparse.ArgumentParser, config_flag: bool = False) -> None:
    """CONFIG (positional, or --config with `config_flag`), overrides and the run flags; parse with
    `parse_intermixed_args` so that overrides may stand before or after the flags."""
    if config_flag:
        parser.add_argument("--config", default=None, help="run config YAML (default: built-in defaults)")
    else:
        parser.add_argument("config", help="YAML run config (see configs/)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_const", const=True, default=None,
                       help="resume from checkpoint.directory's latest (an error if there is none)")
    group.add_argument("--resume-from", dest="resume", metavar="DIR",
                       help="resume from this checkpoint (or this directory's latest)")
    group.add_argument("--no-resume", dest="resume", action="store_false",
                       help="start fresh even if a checkpoint exists (needs --overwrite if checkpoints exist)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="end (with a checkpoint) after this global step; resume later with the same config")
    parser.add_argument("--overwrite", action="store_true",
                        help="let a fresh run replace the checkpoints in checkpoint.directory, and replace a "
                             "previous export in export.peft_dir")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
