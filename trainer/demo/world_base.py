"""The demo world's base model: a small SD1.5-family UNet pretrained on the world's plain scenes, shipped as
`world_base.safetensors`, so that the demo starts as a user does, from a base that already draws people.

A base trained from random weights for the few hundred steps a demo run can afford denoises held-out scenes but
never composes a person from noise: its samples are colour blobs. So the base is trained once, by

    python -m trainer world-base           # seeded, with a progress bar (RECIPE below; about 33 minutes here)

on plain scenes of a seed stream of its own (none of the demo's pictures), through the trainer's own stage-1 loop
with caption dropout (kohya's caption_dropout_rate: the unconditional prediction that classifier-free guidance
needs), and shipped next to this module: UNet weights only, fp16. The rest of the checkpoint is regenerated: the
text encoder is CLIP-L with random weights from a fixed seed (checked on load against the hash the base was
trained with: a different torch or init would give other encodings, and the base would draw blobs again), and the
VAE is the shipped world VAE (vae.py). The UNet is the smallest shape the stock CheckpointLoaderSimple detects as
SD1.5 (model_channels 320, context_dim 768; one level, no middle block: harness/tiny_models.DETECTABLE_SD15).
A change to the world's drawing (world.VERSION) needs a new file: loading checks the version it was trained on.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from ...mole_ops.errors import MoLEError

log = logging.getLogger("mole.trainer")
SHIPPED = Path(__file__).with_name("world_base.safetensors")
TEXT_SEED = 1            # the seed of the text encoder's random weights (detectable_state_dict's seed + 1)
UNET_PREFIX = "model.diffusion_model."
# fp32: bf16 autocast is about 20 times slower on this project's CPUs (no bf16 matrix units)
RECIPE = {"pictures": 2048, "steps": 1600, "batch": 16, "lr": 5e-4, "warmup": 100, "caption_dropout_rate": 0.1,
          "precision": "no", "seed": 0}
STREAM_SEED = 30_000     # the plain scenes' seed stream (the demo's worlds use seed and seed + 10_000)


def text_encoder_hash(checkpoint: Path) -> str:
    """sha256 of a checkpoint file's text-encoder tensors (`cond_stage_model.*`, sorted by key, as stored)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(checkpoint), "pt") as f:
        for key in sorted(k for k in f.keys() if k.startswith("cond_stage_model.")):
            digest.update(key.encode())
            digest.update(f.get_tensor(key).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load(path: Path = SHIPPED) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The shipped base's UNet weights (`model.diffusion_model.*`, fp16) and metadata, checked: trained on this
    version of the world, every key and shape of the detectable SD1.5 UNet and nothing else."""
    from ..harness.tiny_models import DETECTABLE_SD15, unet_shapes
    from . import assets

    tensors, metadata = assets.read(path, "the world's base model", "world-base", " (or `python -m trainer demo "
                                    "--from-scratch` trains everything without it)")
    if not metadata.get("mole.text_encoder_sha256"):
        raise MoLEError(f"{path}: metadata key 'mole.text_encoder_sha256' is missing (the hash of the text encoder "
                        "it was trained with); `python -m trainer world-base` writes a complete file")
    expected = {UNET_PREFIX + k: v for k, v in unet_shapes("SD15", DETECTABLE_SD15).items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        shaped = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        detail = (f"{len(missing)} missing (first {missing[0]!r})" if missing else
                  f"{len(unexpected)} unexpected (first {unexpected[0]!r})" if unexpected else
                  f"{shaped[0]!r} has shape {found[shaped[0]]}, expected {expected[shaped[0]]}")
        raise MoLEError(f"{path}: not the UNet of the world base ({detail}); `python -m trainer world-base` "
                        "writes a new one")
    return tensors, metadata


def write_checkpoint(path: Path, base: Path = SHIPPED) -> Path:
    """A full single-file checkpoint the stock loader detects as SD1.5: the shipped UNet, the text encoder
    regenerated from TEXT_SEED (its hash checked against the one the base was trained with) and the world VAE."""
    from ..harness.tiny_models import write_detectable_checkpoint
    from . import vae

    unet, metadata = load(base)
    write_detectable_checkpoint(path, seed=TEXT_SEED - 1, vae=vae.load(), unet=unet)
    found = text_encoder_hash(path)
    if found != metadata["mole.text_encoder_sha256"]:
        Path(path).unlink()
        raise MoLEError(f"{base}: trained with a text encoder of sha256 {metadata['mole.text_encoder_sha256'][:16]}, "
                        f"but this torch regenerates one of {found[:16]} from seed {TEXT_SEED}; `python -m trainer "
                        "world-base` trains a base for this installation")
    return Path(path)


# -- `python -m trainer world-base` ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .assets import add_training_arguments

    add_training_arguments(parser, "the base's UNet", SHIPPED, RECIPE["steps"])
    parser.add_argument("--work_dir", type=Path, help="keep the training pictures, caches and log here (default: "
                                                      "a temporary folder, removed at the end)")
    parser.set_defaults(run=run)


def train(output: Path, steps: int, work: Path) -> Path:
    """Pretrain the base on plain scenes with the trainer's stage-1 loop and write its UNet (fp16) to `output`."""
    from safetensors.torch import load_file

    from ..harness.tiny_models import write_detectable_checkpoint
    from ..training.config import TrainConfig, validate
    from ..training.loop import Run
    from . import assets, vae, world

    scenes = world.write_set(work / "plain", "plain", RECIPE["pictures"], STREAM_SEED, 64)
    toml = world.write_dataset_toml(work / "plain.toml", {scenes.name: None}, 64, RECIPE["batch"])
    start = work / "random_start.safetensors"
    write_detectable_checkpoint(start, seed=TEXT_SEED - 1, vae=vae.load())
    config = TrainConfig(stage="finetune", pretrained_model_name_or_path=str(start), dataset_config=str(toml),
                         output_dir=str(work / "train"), output_name="world_base", resolution="64",
                         cache_latents=True, max_train_steps=steps, learning_rate=RECIPE["lr"],
                         lr_scheduler="cosine", lr_warmup_steps=min(RECIPE["warmup"], steps - 1),
                         caption_dropout_rate=RECIPE["caption_dropout_rate"],
                         mixed_precision=RECIPE["precision"], seed=RECIPE["seed"])
    validate(config)
    produced = Run(config).train()
    unet = {k: v for k, v in load_file(str(produced)).items() if k.startswith(UNET_PREFIX)}
    metadata = {"mole.world_version": str(world.VERSION), "mole.recipe": json.dumps({**RECIPE, "steps": steps}),
                "mole.text_encoder_sha256": text_encoder_hash(start),
                "modelspec.architecture": "stable-diffusion-v1", "modelspec.title": "MoLE demo world base (UNet)"}
    return assets.write(unet, output, metadata)


def run(args: argparse.Namespace) -> int:
    from ..harness.host import use_comfy

    use_comfy()
    torch.manual_seed(RECIPE["seed"])
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mole-world-base-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        path = train(args.output, args.steps, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    log.info("world base: %d steps; UNet written to %s", args.steps, path)
    return 0
