"""Sample images while training, from a kohya prompt file, through ComfyUI's own sampler.

Prompt file: one prompt per line (`#` starts a comment), options after the prompt: `--n` negative prompt,
`--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int = 0
    cfg: float = 7.5
    steps: int = 20


OPTIONS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
           "l": ("cfg", float), "s": ("steps", int)}


def parse_prompt_file(path: str | Path, size: tuple[int, int]) -> list[SamplePrompt]:
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\s--(?=[a-z]\s)", " " + line)
        item = SamplePrompt(parts[0].strip(), width=size[0], height=size[1], seed=number)
        for part in parts[1:]:
            key, _, value = part.partition(" ")
            if key not in OPTIONS:
                raise ConfigError(f"{path} line {number}: unknown option --{key} (known: --n --w --h --d --l --s)")
            name, kind = OPTIONS[key]
            try:
                setattr(item, name, kind(value.strip()))
            except ValueError as e:
                raise ConfigError(f"{path} line {number}: --{key} {value.strip()!r} is not a {kind.__name__}") from e
        if item.width % 8 or item.height % 8:
            raise ConfigError(f"{path} line {number}: --w and --h must be multiples of 8")
        prompts.append(item)
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    return prompts


def _conditioning(base, text: str, size: tuple[int, int]):
    tokens = base.clip.tokenize(text)
    cond, pooled = base.clip.encode_from_tokens(tokens, return_pooled=True)
    extra = {"pooled_output": pooled}
    if base.family == "SDXL":
        extra.update(width=size[0], height=size[1], target_width=size[0], target_height=size[1])
    return [[cond, extra]]


@torch.no_grad()
def generate(base, item: SamplePrompt, sampler: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """One image (1, H, W, 3) in [0, 1] of the base model as it is now (trained hooks included)."""
    import comfy.sample

    size = (item.width, item.height)
    latent = torch.zeros(1, 4, item.height // 8, item.width // 8)
    noise = comfy.sample.prepare_noise(latent, item.seed)
    samples = comfy.sample.sample(base.patcher, noise, item.steps, item.cfg, sampler, scheduler,
                                  _conditioning(base, item.prompt, size), _conditioning(base, item.negative, size),
                                  latent, disable_pbar=True, seed=item.seed)
    return base.vae.decode(samples)


def save_samples(base, prompts: list[SamplePrompt], folder: Path, name: str, step: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, item in enumerate(prompts):
        image = generate(base, item)[0]
        path = folder / f"{name}_{step:06d}_{i:02d}.png"
        Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy().astype(np.uint8)).save(path)
        paths.append(path)
    return paths
