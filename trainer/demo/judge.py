"""The demo world's judge: what HPS and ImageReward are for real pictures, for the world's pictures.

A small convolutional network that, for any 64 px picture, finds the person, the face and the hand (a mask each)
and says how detailed the face and the hand are (a detailed face with hair, eyes and a smile against a bare
disc; fingers with the lines between them against a mitten). It learns from the ground truth the world already
has: renders of scenes with every mix of detailed and plain parts, close-ups and empty backgrounds, each after a
round trip through the world VAE (so it judges what the decoder can draw, not the crisp renders).

Per picture it reports: person found, face found, hand found (the part's mask covers at least FOUND_PIXELS
pixels) and face detail, hand detail (the mean detail probability over the part's found mask; NaN where the part
is not found). Trained once, by

    python -m trainer world-judge          # seeded, about 3 minutes on 2 cores

and shipped next to this module (`world_judge.safetensors`, fp16); loading checks keys, shapes and the world
version. Its accuracy on held-out renders (mask IoU per part, detail AUC per part) is in the file's metadata and
in the demo's report.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...mole_ops.errors import MoLEError

log = logging.getLogger("mole.trainer")
SHIPPED = Path(__file__).with_name("world_judge.safetensors")
MASKS = ("person", "face", "hand")
DETAIL = ("face", "hand")
FOUND_PIXELS = 48             # a part counts as found when its mask covers this many pixels (a face: ~450)
WIDTHS = (32, 48, 64)         # at 32, 16 and 8 px: a stride-2 stem halves the 64 px picture first
RECIPE = {"pictures": 2100, "steps": 1500, "batch": 32, "lr": 3e-3, "seed": 0}


class JudgeNet(nn.Module):
    """A small U-Net: (B, 3, 64, 64) pixels in [0, 1] -> (B, 5, 64, 64) logits: person, face and hand masks, then
    face and hand detail (read inside the part's mask). A stride-2 stem halves the picture (the parts are 20-40 px
    across), the U-Net works at 32, 16 and 8 px, and the logits are upsampled back to the picture's size."""

    def __init__(self, widths=WIDTHS):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.SiLU())
        self.down = nn.ModuleList()
        c = widths[0]
        for w in widths:
            self.down.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                                           nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()))
            c = w
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.Sequential(nn.Conv2d(c + w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()))
            c = w
        self.head = nn.Conv2d(c, len(MASKS) + len(DETAIL), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], 1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


@dataclass
class Verdict:
    """What the judge sees in one picture."""

    masks: dict[str, np.ndarray]          # person / face / hand -> (H, W) bool
    detail: dict[str, float]              # face / hand -> mean detail probability over the found mask, or NaN

    def found(self, part: str) -> bool:
        return int(self.masks[part].sum()) >= FOUND_PIXELS

    def scores(self) -> dict[str, float]:
        """The judge's columns: person/face/hand found (0 or 1), all three found (0 or 1), face/hand detail (NaN
        where that part is not found)."""
        out = {f"{part}_found": float(self.found(part)) for part in MASKS}
        out["all_found"] = float(all(self.found(part) for part in MASKS))
        out.update({f"{part}_detail": self.detail[part] for part in DETAIL})
        return out


class Judge:
    """The trained network, in eval mode on the CPU."""

    def __init__(self, net: JudgeNet, metadata: dict[str, str] | None = None):
        self.net = net.eval().requires_grad_(False)
        self.metadata = metadata or {}

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 5, H, W) probabilities (H, W multiples of 8)."""
        return torch.cat([torch.sigmoid(self.net(pixels[i:i + batch].float())) for i in range(0, len(pixels), batch)])

    def judge(self, pixels: torch.Tensor) -> list[Verdict]:
        out = []
        for p in self.probabilities(pixels):
            masks = {part: (p[i] > 0.5).numpy() for i, part in enumerate(MASKS)}
            detail = {}
            for j, part in enumerate(DETAIL):
                m = masks[part]
                detail[part] = float(p[len(MASKS) + j].numpy()[m].mean()) if m.sum() >= FOUND_PIXELS else math.nan
            out.append(Verdict(masks, detail))
        return out

    def judge_files(self, paths: list[Path]) -> list[Verdict]:
        """Pictures from files (any size: resized to 64 px, as the world is drawn)."""
        from PIL import Image

        images = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("RGB").resize((64, 64), Image.BICUBIC), np.float32) / 255)
            except OSError as e:
                raise MoLEError(f"{path}: the world judge cannot read this picture ({e})") from e
        return self.judge(torch.from_numpy(np.stack(images)).movedim(-1, 1))


# -- data: world renders after a round trip through the world VAE ----------------------------------------------
KINDS = ("scene", "face_scene", "hand_scene", "plain", "faces", "hands", "empty")


def render(rng: random.Random, kind: str):
    """(image, {mask name: bool mask}, {part: detailed or None (absent)}) of one picture of `kind`."""
    from PIL import Image

    from . import world

    if kind == "empty":
        _, bg = world._colour(rng, world.BACKGROUNDS)     # as the world draws a background (the shipped file's data)
        empty = np.zeros((64, 64), bool)
        return Image.new("RGB", (64, 64), bg), {m: empty for m in MASKS}, {p: None for p in DETAIL}
    if kind in ("faces", "hands"):
        part = kind[:-1]
        p = world.closeup(rng, part)
        return p.image, {**p.masks, "person": p.person}, {q: (True if q == part else None) for q in DETAIL}
    detailed = {"scene": True, "plain": False, "face_scene": ("face",), "hand_scene": ("hand",)}[kind]
    p = world.scene(rng, detailed=detailed)
    flags = {q: (q in detailed) if isinstance(detailed, tuple) else detailed for q in DETAIL}
    return p.image, {**p.masks, "person": p.person}, flags


def dataset(count: int, stream: str, taesd) -> dict[str, torch.Tensor]:
    """`count` renders of every kind in turn, round-tripped through the VAE: pixels (N, 3, 64, 64) in [0, 1],
    masks (N, 3, 64, 64), detail targets (N, 2) (1 detailed, 0 plain, -1 absent)."""
    from ..training.progress import bar

    rng = random.Random(f"judge:{stream}")
    images, masks, detail = [], [], []
    for i in bar(range(count), desc="drawing pictures", unit="img"):
        image, m, flags = render(rng, KINDS[i % len(KINDS)])
        images.append(np.asarray(image, np.float32) / 255)
        masks.append(np.stack([m[name] for name in MASKS]).astype(np.float32))
        detail.append([-1.0 if flags[p] is None else float(flags[p]) for p in DETAIL])
    pixels = torch.from_numpy(np.stack(images)).movedim(-1, 1)
    with torch.no_grad():
        pixels = torch.cat([taesd.decode(taesd.encode(pixels[i:i + 64] * 2 - 1)).clamp(-1, 1) * 0.5 + 0.5
                            for i in range(0, len(pixels), 64)])
    return {"pixels": pixels, "masks": torch.from_numpy(np.stack(masks)), "detail": torch.tensor(detail)}


def loss(net: JudgeNet, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mask BCE everywhere, plus detail BCE inside each present part's true mask."""
    logits = net(batch["pixels"])
    masks = batch["masks"]
    total = F.binary_cross_entropy_with_logits(logits[:, :len(MASKS)], masks)
    for j, part in enumerate(DETAIL):
        where = masks[:, MASKS.index(part)] * (batch["detail"][:, j] >= 0).float()[:, None, None]
        target = batch["detail"][:, j].clamp(min=0)[:, None, None].expand_as(where)
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, len(MASKS) + j], target, reduction="none")
        total = total + (per_pixel * where).sum() / where.sum().clamp(min=1)
    return total


def train(data: dict[str, torch.Tensor], steps: int, batch: int, lr: float, seed: int) -> Judge:
    from ..training.progress import bar

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = JudgeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    with torch.inference_mode(False), torch.enable_grad(), bar(range(steps), desc="training the judge",
                                                                 unit="step") as shown:
        for _ in shown:
            idx = torch.randint(0, len(data["pixels"]), (batch,), generator=gen)
            flip = torch.rand(batch, generator=gen) < 0.5
            rows = {k: v[idx] for k, v in data.items()}
            for k in ("pixels", "masks"):
                rows[k] = torch.where(flip[:, None, None, None], rows[k].flip(-1), rows[k])
            value = loss(net, rows)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            shown.set_postfix(loss=f"{value.item():.4f}")
    return Judge(net)


def accuracy(judge: Judge, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """On held-out renders: IoU of each found mask with the true one (over all pictures' pixels), detail AUC per
    part (detailed against plain, over pictures where the part is drawn and found), and the found rates where a
    part is drawn and where it is not."""
    from .evidence import auc

    verdicts = judge.judge(data["pixels"])
    out = {}
    for i, part in enumerate(MASKS):
        truth = data["masks"][:, i].numpy() > 0.5
        found = np.stack([v.masks[part] for v in verdicts])
        out[f"{part}_iou"] = float((truth & found).sum() / max(1, (truth | found).sum()))
        drawn = truth.reshape(len(truth), -1).sum(1) > 0
        hits = np.array([v.found(part) for v in verdicts])
        out[f"{part}_found_when_drawn"] = float(hits[drawn].mean())
        out[f"{part}_found_when_absent"] = float(hits[~drawn].mean()) if (~drawn).any() else math.nan
    for j, part in enumerate(DETAIL):
        flags = data["detail"][:, j].numpy()
        scores = np.array([v.detail[part] for v in verdicts])
        ok = ~np.isnan(scores)
        known = ok & (flags >= 0)
        out[f"{part}_detail_auc"] = auc(scores[known], flags[known] == 1)
    return out


# -- the shipped file ---------------------------------------------------------------------------------------------
def save(judge: Judge, path: Path, metadata: dict[str, str]) -> Path:
    from . import assets

    return assets.write(judge.net.state_dict(), path, metadata)


def load(path: Path = SHIPPED) -> Judge:
    """The shipped judge, checked: every key and shape of JudgeNet, trained on this version of the world."""
    from . import assets

    tensors, metadata = assets.read(path, "the world judge", "world-judge")
    net = JudgeNet()
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise MoLEError(f"{path}: not a world judge (key {wrong[0]!r}: expected "
                        f"{expected.get(wrong[0], 'no such key')}, found {found.get(wrong[0], 'missing')})")
    net.load_state_dict({k: v.float() for k, v in tensors.items()})
    return Judge(net, metadata)


# -- `python -m trainer world-judge` --------------------------------------------------------------------------
VALIDATION_STREAM = "judge-validation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .assets import add_training_arguments

    add_training_arguments(parser, "the judge", SHIPPED, RECIPE["steps"])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..harness.host import use_comfy
    from . import vae, world

    use_comfy()
    taesd = vae.load()
    data = dataset(RECIPE["pictures"], "train", taesd)
    judge = train(data, args.steps, RECIPE["batch"], RECIPE["lr"], RECIPE["seed"])
    found = accuracy(judge, dataset(700, VALIDATION_STREAM, taesd))
    save(judge, args.output, {"mole.world_version": str(world.VERSION),
                              "mole.recipe": json.dumps({**RECIPE, "steps": args.steps}),
                              "mole.validation": json.dumps({k: round(v, 4) for k, v in found.items()})})
    log.info("world judge on 700 validation renders: %s; written to %s",
             ", ".join(f"{k} {v:.3f}" for k, v in found.items()), args.output)
    return 0
