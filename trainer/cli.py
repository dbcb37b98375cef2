"""Command line of the offline pipelines: `python -m trainer <command> ...` (or the `mole-train` script)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import audit, config, demo, prepare, workflows
from ..mole_ops.errors import MoLEError

TRAIN = {"train-base": ("finetune", "stage 1: fine-tune the whole UNet (a full checkpoint)"),
         "train-expert": ("expert", "stage 2: train one LoRA expert (a kohya LoRA file)"),
         "train-gates": ("gates", "stage 3: train the gates of frozen experts (a gate file, optionally a pack)")}


def _train(stage: str):
    def run(args: argparse.Namespace) -> int:
        from .loop import train

        train(config.from_args(args, stage))
        return 0
    return run


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of `python -m trainer` and of the `mole-train` console script."""
    prog = prog or os.path.basename(sys.argv[0]) or "mole-train"
    parser = argparse.ArgumentParser(prog=prog, description="ComfyUI-MoLE offline pipelines")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help=demo.__doc__.splitlines()[0]))
    workflows.add_arguments(commands.add_parser("workflows", help="rewrite workflows/ (UI format and API twins) "
                                                "from the node definitions of a real ComfyUI"))
    audit.add_arguments(commands.add_parser("audit", help="EMoE prompt audit: uncertainty score per prompt, "
                                            "quartiles, per-group statistics and plots",
                                            description=audit.__doc__.split("\n\n")[0]))
    prepare.add_arguments(commands.add_parser("prepare", help="dataset preparation as in the paper: sliding-window "
                                              "crops, caption clean-up, optional CLIP score filter, kohya metadata",
                                              description=prepare.__doc__.split("\n\n")[0]))
    for command, (stage, text) in TRAIN.items():
        sub = commands.add_parser(command, help=text, description=text + ". Flags are kohya sd-scripts' names.")
        config.add_arguments(sub, stage)
        sub.set_defaults(run=_train(stage))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except MoLEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
