"""Held-out denoising loss at fixed noise and timesteps: the one evaluation that the trainer (its tests compare
before and after training) and the demo's evidence (every model of its ablation) use.

Pictures are taken in groups of `batch`; each group draws its noise and timesteps from a generator seeded with
`seed`, `repeats` times (noise first, then t ~ U{0..T-1} with T the base's schedule length), so the same pictures
always meet the same noise: numbers before and after training, or across models, are comparable. The loss is the
plain eps-MSE per picture (mean over C, H, W), averaged over pictures and draws. Whatever is attached to the base
(a stage's hooks, a MoLE under evaluation) acts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from .data import load_image


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def cell_fractions(mask, hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask (H, W) (bool or weights in [0, 1]) -> (h, w): each latent cell's mean of its pixels (the share of
    the cell a region covers)."""
    t = torch.as_tensor(mask, dtype=torch.float32)
    return torch.nn.functional.adaptive_avg_pool2d(t[None, None], hw)[0, 0]


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


@torch.no_grad()
def held_out_cell_errors(base, pictures: Sequence[tuple[Path, str]], seed: int, repeats: int = 4, batch: int = 8,
                         size: tuple[int, int] | None = None, encoded: dict | None = None) -> list[torch.Tensor]:
    """Per picture, the eps error of each latent cell (mean over channels of (eps_hat - eps)^2), averaged over the
    `repeats` fixed draws: a list of (h, w) maps in the pictures' order; images at `size` (default: each group's
    first image's own size). `encoded`: a dict kept by the caller to reuse the latents and text encodings of the
    same pictures on the same base (several models on one checkpoint)."""
    maps = []
    for group in batches(list(pictures), batch):
        group_size = size or image_size(group[0][0])
        key = (tuple(group), group_size)
        if encoded is None or key not in encoded:
            x0 = base.encode_images(torch.stack([load_image(path, group_size) for path, _ in group]))
            cond = base.encode_text([caption for _, caption in group], group_size)
            if encoded is not None:
                encoded[key] = x0, cond
        else:
            x0, cond = encoded[key]
        gen = torch.Generator().manual_seed(seed)
        total = torch.zeros(len(group), *x0.shape[-2:])
        for _ in range(repeats):
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, len(base.alphas_cumprod), (len(group),), generator=gen)
            eps = base.predict(base.noisy(x0, noise, t), t, cond)
            total += ((eps.float() - noise.float()) ** 2).mean(dim=1).cpu()
        maps += list(total / repeats)
    return maps


def held_out_loss(base, pictures: Sequence[tuple[Path, str]], seed: int, repeats: int = 4, batch: int = 8,
                  size: tuple[int, int] | None = None) -> float:
    """Mean eps-MSE of (image, caption) pairs under fixed draws (the mean of held_out_cell_errors' maps)."""
    maps = held_out_cell_errors(base, pictures, seed, repeats, batch, size)
    return float(torch.stack([m.mean() for m in maps]).mean())
