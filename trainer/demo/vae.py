"""A TAESD-shaped autoencoder trained briefly on a set of images (the synthetic world), so that a checkpoint with
it is one the stock loader detects and its latents describe the world's pictures.

After training, `vae_scale` and `vae_shift` are set so that the encoded latents, times the SD1.5 latent factor
0.18215 the model applies, have zero mean and unit variance, as SD's own latents roughly do.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("mole.trainer")
SD_LATENT_FACTOR = 0.18215


def train_taesd(images: list[Path], size: int, steps: int = 300, batch: int = 8, lr: float = 2e-3,
                seed: int = 0, crop: int = 32):
    """A ComfyUI TAESD module trained to reconstruct `images` (resized to size x size), on random crop x crop
    patches (its convolutions do not care where a patch came from; a quarter of the pixels is 4x faster)."""
    import comfy.taesd.taesd
    from ..training.progress import bar

    from ..training.data import load_image
    from ..harness.tiny_models import init_parameters

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.stack([load_image(p, (size, size)) for p in images]).movedim(-1, 1) * 2 - 1   # (N, 3, H, W)
    taesd = comfy.taesd.taesd.TAESD()
    init_parameters(taesd.taesd_encoder, seed)          # ComfyUI's ops leave weights uninitialised
    init_parameters(taesd.taesd_decoder, seed + 1)
    params = list(taesd.taesd_encoder.parameters()) + list(taesd.taesd_decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    with torch.inference_mode(False), torch.enable_grad(), bar(range(steps), desc="training the VAE",
                                                                 unit="step") as shown:
        for _ in shown:
            idx = torch.randint(0, len(pixels), (batch,), generator=gen)
            top, left = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=gen) // 8 * 8)
            x = pixels[idx, :, top:top + crop, left:left + crop]
            flip = torch.rand(batch, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            latent = taesd.taesd_encoder(x * 0.5 + 0.5)
            out = taesd.taesd_decoder(latent).sub(0.5).mul(2)
            loss = (out - x).abs().mean() + 1e-4 * latent.square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            shown.set_postfix(l1=f"{loss.item():.4f}")
    with torch.no_grad():
        latents = torch.cat([taesd.taesd_encoder(pixels[i:i + 64] * 0.5 + 0.5) for i in range(0, len(pixels), 64)])
        std, mean = latents.std().item(), latents.mean().item()
        # encode = enc / scale + shift; want (encode * 0.18215) ~ N(0, 1)
        taesd.vae_scale.fill_(std * SD_LATENT_FACTOR)
        taesd.vae_shift.fill_(-mean / (std * SD_LATENT_FACTOR))
        recon = taesd.decode(taesd.encode(pixels[:64]))
        log.info("VAE: L1 reconstruction error %.4f (pixels in [-1, 1]); latent std %.3f", 
                 (recon - pixels[:64]).abs().mean().item(), std)
    return taesd.requires_grad_(False)
