"""Command line of the offline pipelines: `python -m trainer <command> ...` (or the `mole-train` script).

Dispatch is lazy: the top-level parser knows each command's name and summary, and only the chosen command's
module is imported (a training run never imports the demo, the test harness or the audit; nothing imports
ComfyUI before a command runs).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass

from ..mole_ops.errors import MoLEError


@dataclass(frozen=True)
class Command:
    module: str                 # relative to this package; it has add_arguments(parser) and sets `run`
    summary: str
    stage: str | None = None    # the training commands: add_arguments(parser, stage), run by the loop


COMMANDS = {
    "demo": Command("demo.pipeline", "the whole MoLE pipeline in a synthetic world on this machine, with a report"),
    "pictures": Command("demo.pictures", "render the template thumbnails and README screenshots from the demo's "
                        "files in a real ComfyUI and its frontend (needs chromium)"),
    "serve": Command("demo.serve", "ComfyUI's UI on the demo's trained files (built first if missing), with "
                     "demo-sized workflows"),
    "world-vae": Command("demo.vae", "train the demo world's VAE (a TAESD) once; the demo ships and uses it"),
    "world-base": Command("demo.world_base", "pretrain the demo world's base model once on plain scenes; the demo "
                          "ships it and starts from it"),
    "world-judge": Command("demo.judge", "train the demo world's judge once (finds person, face and hand in a "
                           "picture and scores their detail); the demo ships it"),
    "workflows": Command("harness.workflows", "rewrite workflows/ (UI format and API twins) and the node labels "
                         "(locales/en/nodeDefs.json) from the node definitions of a real ComfyUI"),
    "audit": Command("audit", "EMoE prompt audit: uncertainty score per prompt, quartiles, per-group statistics "
                     "and plots"),
    "expert-effect": Command("training.expert_effect", "does each expert help its own part more than the others? "
                             "per-region change in denoising error, before training gates"),
    "prompts": Command("benchmarks.prompts", "the paper's COCO and DiffusionDB human-prompt benchmarks from your "
                       "own copies: filtered, sampled k x repeats, with a report"),
    "evaluate": Command("benchmarks.evaluate", "HPS v2, ImageReward and CLIP score of models on a prompt benchmark, "
                        "through ComfyUI's sampler, with paired differences and error bars (the paper's tables)"),
    "kohya-table": Command("training.kohya", "write docs/kohya.md: every kohya flag the trainer takes, implemented, "
                           "accepted with no effect, or refused, from the registry the parser uses"),
    "pack": Command("pack", "share a MoLE: experts + gates (+ card TOML, preview) -> one pack with its card in the "
                    "metadata, a model card (.md) and a ready ComfyUI workflow"),
    "resize-experts": Command("resize", "an expert LoRA reduced to the rank it uses (kohya's resize flags, and an "
                              "energy share), written as a kohya LoRA that its gate files still find"),
    "prepare": Command("training.prepare", "dataset preparation as in the paper: sliding-window crops, caption "
                       "clean-up, optional CLIP score filter, kohya metadata"),
}


def commands() -> dict[str, Command]:
    """Every command; the training stages come from their one registry (training/stages.py)."""
    from .training.stages import STAGES

    stages = {s.command: Command("training.config", s.summary, s.name) for s in STAGES.values()}
    return {**COMMANDS, **stages}


def _train(stage: str):
    def run(args: argparse.Namespace) -> int:
        from .training import config
        from .training.loop import train

        train(config.from_args(args, stage))
        return 0
    return run


def _configure(parser: argparse.ArgumentParser, command: Command) -> None:
    module = importlib.import_module(f".{command.module}", __package__)
    if command.stage is None:
        parser.description = (module.__doc__ or command.summary).split("\n\n")[0]
        module.add_arguments(parser)
    else:
        parser.description = command.summary + ". Flags are kohya sd-scripts' names."
        module.add_arguments(parser, command.stage)
        parser.set_defaults(run=_train(command.stage))


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of `python -m trainer` and of the `mole-train` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or os.path.basename(sys.argv[0]) or "mole-train"
    parser = argparse.ArgumentParser(prog=prog, description="ComfyUI-MoLE offline pipelines")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    chosen = _chosen(argv)
    for name, command in commands().items():
        sub = subparsers.add_parser(name, help=command.summary)
        if name == chosen:
            _configure(sub, command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except MoLEError as e:
        # one clear line; a server's failure names its log instead of printing its tail
        summary = getattr(e, "summary", None)
        print(f"error: {summary() if summary else e}", file=sys.stderr)
        return 2
