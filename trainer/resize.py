"""`python -m trainer resize-experts`: an expert LoRA reduced to the rank it uses, written as a kohya LoRA.

kohya's networks/resize_lora.py flags, with kohya's meaning (a pasted resize command keeps the ranks kohya's script
keeps): --model, --save_to, --new_rank (the rank; with a dynamic method the most any layer keeps; kohya's default
4), --dynamic_method sv_fro / sv_cumulative / sv_ratio with --dynamic_param, --save_precision, --verbose. MoLE adds
--dynamic_method energy: the fewest singular values that keep a share --dynamic_param of each layer's Frobenius
energy (sum of squared singular values; kohya's sv_fro p keeps the norm share p, the energy share p^2).

Each layer's delta is factored exactly (mole_ops/rank.py), so ranks differ per layer; the file's metadata says
what was done as kohya's script records it (ss_training_comment, ss_network_dim "Dynamic"), plus the source file's
sha256, rank and alpha (`mole.resized_from`): a gate file trained with the full expert loads with the resized one
(Load MoLE Gates, packs, Apply MoLE), since the gates read the layer input and the official global gate folds
through any (down, up) pair. Stock LoRA loaders load it as any kohya LoRA.

    python -m trainer resize-experts --model face.safetensors --save_to face_99.safetensors \\
        --new_rank 256 --dynamic_method energy --dynamic_param 0.99
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..mole_ops import expert_file, rank
from ..mole_ops.errors import MoLEError

log = logging.getLogger("mole.train")
PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KOHYA_DEFAULT_RANK = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="the expert LoRA to resize (.safetensors)")
    parser.add_argument("--save_to", type=Path, required=True, help="the resized LoRA to write (.safetensors)")
    parser.add_argument("--new_rank", type=int, default=None, help="the rank of every layer; with --dynamic_method "
                        f"the most any layer keeps (kohya's default {KOHYA_DEFAULT_RANK})")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="kohya's rank for 3x3 conv layers (LoCon): "
                        "accepted with no effect, MoLE experts hold only Linear and 1x1 conv layers")
    parser.add_argument("--dynamic_method", choices=("sv_fro", "sv_cumulative", "sv_ratio", "energy"),
                        help="choose each layer's rank from its singular values (kohya's three, and energy)")
    parser.add_argument("--dynamic_param", type=float, help="the target of --dynamic_method (a share in (0, 1], "
                        "or for sv_ratio a ratio >= 1)")
    parser.add_argument("--save_precision", choices=sorted(PRECISIONS), help="dtype to save in (default: the "
                        "file's own)")
    parser.add_argument("--device", default=None, help="accepted for kohya's command lines; the factorisation runs "
                        "on the CPU (it works on rank x rank matrices)")
    parser.add_argument("--verbose", action="store_true", help="one line per layer: rank kept and error")
    parser.set_defaults(run=run)


def rule_of(args: argparse.Namespace) -> rank.RankRule:
    if args.new_rank is not None and args.new_rank < 1:
        raise MoLEError(f"--new_rank {args.new_rank}: a rank is a whole number >= 1")
    if args.dynamic_method is None:
        if args.dynamic_param is not None:
            raise MoLEError("--dynamic_param needs --dynamic_method (sv_fro, sv_cumulative, sv_ratio or energy)")
        return rank.RankRule("fixed", max_rank=args.new_rank or KOHYA_DEFAULT_RANK)
    if args.dynamic_param is None:
        raise MoLEError(f"--dynamic_method {args.dynamic_method} needs --dynamic_param (kohya: 'If using "
                        "dynamic_method, then dynamic_param is required')")
    return rank.RankRule(args.dynamic_method, args.dynamic_param, args.new_rank or KOHYA_DEFAULT_RANK)


def run(args: argparse.Namespace) -> int:
    from .training.progress import bar

    rule = rule_of(args)
    if Path(args.save_to).resolve() == Path(args.model).resolve():
        raise MoLEError(f"--save_to {args.save_to} is --model itself; write the resized LoRA to a new file")
    expert = expert_file.load(args.model, "expert")
    if args.new_conv_rank is not None:
        log.info("resize-experts: --new_conv_rank has no effect here (no 3x3 conv layers in a MoLE expert)")
    with bar(total=len(expert.layers), desc="resize", unit="layer") as progress:
        reduced = rank.write_resized(args.save_to, expert, rule, PRECISIONS.get(args.save_precision),
                                     lambda done, total: progress.update(done - progress.n))
    stats = reduced.reduction.stats
    if args.verbose:
        for name, k in stats.kept.items():
            log.info("%s: rank %d of %d, energy kept %.2f%%, delta error %.3f%%", name, k, stats.ranks[name],
                     100 * stats.energy[name], 100 * stats.errors[name])
    log.info("%s", stats.summary(Path(args.save_to).name))
    capped = [n for n, k in stats.kept.items() if rule.method != "fixed" and k == rule.max_rank
              and k < stats.ranks[n]]
    if capped and args.new_rank is None:
        log.warning("resize-experts: %d of %d layers stopped at --new_rank %d (kohya's default), not at "
                    "--dynamic_param; give --new_rank %d to let the dynamic method choose", len(capped),
                    len(stats.kept), rule.max_rank, max(stats.ranks.values()))
    log.info("wrote %s (source sha256 %s recorded: gate files trained with %s find it)", args.save_to,
             expert.sha256[:16], Path(args.model).name)
    return 0
