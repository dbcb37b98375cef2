"""The demo world's VAE: a TAESD trained on the world's pictures, shipped as `world_vae.safetensors`.

A TAESD trained from scratch needs thousands of steps before it keeps eyes and the outline of fingers: 400 steps
(75 s, what the demo could afford per run) gave 11-14 dB PSNR and brownish blurs. So it is trained once, by

    python -m trainer world-vae            # about 16 minutes on 2 cores; seeded (22.75 dB on validation scenes)

on pictures of every kind the world draws (their own seed streams, none of the demo's), and shipped next to this
module. The demo puts it into its tiny base checkpoint. A change to the world's drawing (world.VERSION) needs a new
file: loading checks the version it was trained on.

`vae_scale` and `vae_shift` are set so that the encoded latents, times the SD1.5 latent factor 0.18215 the model
applies, have zero mean and unit variance, as SD's own latents roughly do.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from ...mole_ops.errors import MoLEError

log = logging.getLogger("mole.trainer")
SD_LATENT_FACTOR = 0.18215
SHIPPED = Path(__file__).with_name("world_vae.safetensors")
KINDS = ("plain", "scenes", "faces", "hands")


def world_pictures(kind: str, count: int, stream: str, size: int = 64) -> torch.Tensor:
    """(count, 3, size, size) pictures of one kind of the world in [-1, 1], drawn from the seed stream."""
    from . import world

    rng = random.Random(f"{kind}:{stream}")
    images = [np.asarray(world.SETS[kind](rng, size).image, np.float32) / 255 for _ in range(count)]
    return torch.from_numpy(np.stack(images)).movedim(-1, 1) * 2 - 1


def psnr(taesd, pixels: torch.Tensor, batch: int = 64) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of encode-then-decode over the pictures (N, 3, H, W) in [-1, 1]."""
    values = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            x = pixels[i:i + batch]
            recon = taesd.taesd_decoder(taesd.taesd_encoder(x * 0.5 + 0.5)).sub(0.5).mul(2).clamp(-1, 1)
            values.append(10 * torch.log10(1 / ((recon - x) / 2).square().flatten(1).mean(1)))
    return torch.cat(values).mean().item()


def train_taesd(pixels: torch.Tensor, steps: int = 6000, batch: int = 8, lr: float = 2e-3, seed: int = 0,
                crop: int = 32, validation: torch.Tensor | None = None):
    """A ComfyUI TAESD trained to reconstruct `pixels` (N, 3, H, W) in [-1, 1], on random crop x crop patches
    (its convolutions do not care where a patch came from; a quarter of the pixels is 4x faster) with flips: L1
    loss, one-cycle learning rate, and a penalty that keeps the latents inside the decoder's clamp (+-3), where
    they would otherwise saturate and lose what they encode."""
    import comfy.taesd.taesd

    from ..harness.tiny_models import init_parameters
    from ..training.progress import bar

    gen = torch.Generator().manual_seed(seed)
    size = pixels.shape[-1]
    taesd = comfy.taesd.taesd.TAESD()
    init_parameters(taesd.taesd_encoder, seed)          # ComfyUI's ops leave weights uninitialised
    init_parameters(taesd.taesd_decoder, seed + 1)
    params = list(taesd.taesd_encoder.parameters()) + list(taesd.taesd_decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    with torch.inference_mode(False), torch.enable_grad(), bar(range(steps), desc="training the VAE",
                                                                 unit="step") as shown:
        for step in shown:
            idx = torch.randint(0, len(pixels), (batch,), generator=gen)
            top, left = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=gen) // 8 * 8)
            x = pixels[idx, :, top:top + crop, left:left + crop]
            flip = torch.rand(batch, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            latent = taesd.taesd_encoder(x * 0.5 + 0.5)
            l1 = (taesd.taesd_decoder(latent).sub(0.5).mul(2) - x).abs().mean()
            loss = l1 + latent.abs().sub(2).clamp(min=0).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            shown.set_postfix(l1=f"{l1.item():.4f}")
            if validation is not None and (step + 1) % 1000 == 0:
                log.info("VAE step %d: validation PSNR %.2f dB", step + 1, psnr(taesd, validation))
    with torch.no_grad():
        latents = torch.cat([taesd.taesd_encoder(pixels[i:i + 64] * 0.5 + 0.5) for i in range(0, len(pixels), 64)])
        std, mean = latents.std().item(), latents.mean().item()
        # encode = enc / scale + shift; want (encode * 0.18215) ~ N(0, 1)
        taesd.vae_scale.fill_(std * SD_LATENT_FACTOR)
        taesd.vae_shift.fill_(-mean / (std * SD_LATENT_FACTOR))
    return taesd.requires_grad_(False)


def save(taesd, path: Path, metadata: dict[str, str]) -> Path:
    """The TAESD's state dict in fp16 as safetensors, with metadata (temp file + rename)."""
    from . import assets

    return assets.write(taesd.state_dict(), path, metadata)


def load(path: Path = SHIPPED):
    """The shipped world VAE as a ComfyUI TAESD module, checked: the file's keys and shapes are a TAESD's and it
    was trained on this version of the world."""
    import comfy.taesd.taesd

    from . import assets

    tensors, _ = assets.read(path, "the world's VAE", "world-vae")
    taesd = comfy.taesd.taesd.TAESD()
    expected = {k: v.shape for k, v in taesd.state_dict().items()}
    found = {k: v.shape for k, v in tensors.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise MoLEError(f"{path}: not a TAESD state dict (key {wrong[0]!r}: expected "
                        f"{tuple(expected.get(wrong[0], ())) or 'no such key'}, found "
                        f"{tuple(found.get(wrong[0], ())) or 'missing'})")
    taesd.load_state_dict({k: v.float() for k, v in tensors.items()})
    return taesd.requires_grad_(False)


# -- `python -m trainer world-vae` ----------------------------------------------------------------------------
RECIPE = {"per_kind": 512, "steps": 6000, "batch": 8, "lr": 2e-3, "crop": 32, "seed": 0}
VALIDATION_STREAM = "vae-validation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .assets import add_training_arguments

    add_training_arguments(parser, "the VAE", SHIPPED, RECIPE["steps"])
    parser.add_argument("--sheet", type=Path, help="instead of training: write a PNG of world pictures (scenes, "
                                                   "hands, faces) above their reconstructions by the shipped VAE")
    parser.set_defaults(run=run)


def reconstruction_sheet(taesd, path: Path, per_row: int = 6, zoom: int = 2) -> Path:
    """A PNG: for scenes, hand and face close-ups (a stream of their own), a row of pictures above a row of their
    reconstructions, zoomed `zoom` times (nearest neighbour)."""
    from PIL import Image

    rows = []
    for kind in ("scenes", "hands", "faces"):
        x = world_pictures(kind, per_row, "vae-sheet")
        with torch.no_grad():
            recon = taesd.decode(taesd.encode(x)).clamp(-1, 1)
        rows += [torch.cat(list(x), -1), torch.cat(list(recon), -1)]
    pixels = ((torch.cat(rows, -2).movedim(0, -1).numpy() * 0.5 + 0.5) * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels)
    path = Path(path)
    image.resize((image.width * zoom, image.height * zoom), Image.NEAREST).save(path)
    return path


def run(args: argparse.Namespace) -> int:
    from ..harness.host import use_comfy
    from . import world

    use_comfy()
    if args.sheet:
        log.info("wrote %s", reconstruction_sheet(load(args.output), args.sheet))
        return 0
    torch.manual_seed(RECIPE["seed"])
    pixels = torch.cat([world_pictures(kind, RECIPE["per_kind"], "vae") for kind in KINDS])
    validation = world_pictures("scenes", 48, VALIDATION_STREAM)
    taesd = train_taesd(pixels, args.steps, RECIPE["batch"], RECIPE["lr"], RECIPE["seed"], RECIPE["crop"],
                        validation)
    value = psnr(taesd, validation)
    recipe = {**RECIPE, "steps": args.steps}
    save(taesd, args.output, {"mole.world_version": str(world.VERSION), "mole.recipe": json.dumps(recipe),
                              "mole.validation_psnr_db": f"{value:.2f}"})
    log.info("world VAE: %.2f dB PSNR on 48 validation scenes; written to %s", value, args.output)
    return 0
