"""A synthetic human-centric world with known ground truth, for the demo and for measuring the gates.

Scenes: a stylised person (torso, a raised arm) with a "face" glyph (a skin-coloured disc with eyes and a smile) and
a "hand" glyph (a palm with four fingers and a thumb) at varied positions, sizes and colours, on a coloured
background; a caption from templates naming what is there; pixel masks of the face and the hand. Close-ups: one
face or one hand filling most of the picture (the stage-2 data). Everything is drawn with PIL from a seed.

`write_world(folder, seed, ...)` writes kohya datasets (images + `.caption` files + dataset TOMLs) for training
and held-out sets with masks for the evidence. Nothing is downloaded.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = 1
BACKGROUNDS = {"blue": (52, 84, 178), "green": (60, 140, 72), "purple": (112, 64, 150), "grey": (120, 120, 124),
               "orange": (214, 120, 40), "teal": (40, 140, 140)}
SHIRTS = {"red": (200, 40, 44), "yellow": (228, 200, 48), "white": (236, 236, 236), "black": (28, 28, 32),
          "pink": (230, 120, 170)}
SKINS = {"light": (240, 200, 170), "tan": (208, 160, 112), "brown": (150, 100, 64), "dark": (96, 62, 40)}


@dataclass
class Picture:
    image: Image.Image
    caption: str
    masks: dict[str, np.ndarray]        # "face"/"hand" -> (H, W) bool


def _colour(rng: random.Random, table: dict, avoid: str | None = None) -> tuple[str, tuple]:
    name = rng.choice(sorted(n for n in table if n != avoid))
    jitter = [rng.randint(-12, 12) for _ in range(3)]
    return name, tuple(max(0, min(255, c + j)) for c, j in zip(table[name], jitter))


def _mask(size: int, draw_fn) -> np.ndarray:
    m = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(m), 255)
    return np.asarray(m) > 127


def draw_face(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, skin, fill=None) -> None:
    """A face glyph: disc, two eyes, a smile. With `fill`, only the silhouette (for the mask)."""
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill or skin)
    if fill is not None:
        return
    e = max(1.0, r * 0.16)
    for sx in (-1, 1):
        ex, ey = cx + sx * r * 0.38, cy - r * 0.2
        d.ellipse((ex - e, ey - e, ex + e, ey + e), fill=(20, 20, 24))
    d.arc((cx - r * 0.5, cy - r * 0.2, cx + r * 0.5, cy + r * 0.55), 20, 160, fill=(120, 30, 40),
          width=max(1, round(r * 0.14)))


def draw_hand(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, skin, fill=None, mirror=False) -> None:
    """A hand glyph of size s: a palm, four fingers up and a thumb to one side."""
    colour = fill or skin
    d.rounded_rectangle((cx - s * 0.35, cy - s * 0.1, cx + s * 0.35, cy + s * 0.5), radius=s * 0.12, fill=colour)
    fw = s * 0.14
    for i in range(4):
        fx = cx - s * 0.3 + i * s * 0.2
        length = s * (0.45 if i in (1, 2) else 0.36)
        d.rounded_rectangle((fx - fw / 2 + fw * 0.1, cy - s * 0.1 - length, fx + fw / 2, cy), radius=fw * 0.45,
                            fill=colour)
    sign = -1 if mirror else 1
    x0, x1 = cx + sign * s * 0.28, cx + sign * s * 0.55
    d.rounded_rectangle((min(x0, x1), cy + s * 0.05, max(x0, x1), cy + s * 0.22), radius=fw * 0.4, fill=colour)
    if fill is None:   # knuckle lines give the glyph texture a face does not have
        for i in range(3):
            x = cx - s * 0.2 + i * s * 0.2
            d.line((x, cy + s * 0.05, x, cy + s * 0.25), fill=tuple(int(c * 0.75) for c in skin), width=1)


def scene(rng: random.Random, size: int = 64) -> Picture:
    """A person with a face and one raised hand, both clearly apart."""
    bg_name, bg = _colour(rng, BACKGROUNDS)
    shirt_name, shirt = _colour(rng, SHIRTS)
    skin_name, skin = _colour(rng, SKINS)
    k = size / 64
    r = rng.uniform(7.5, 10.5) * k                     # face radius
    s = rng.uniform(12, 16) * k                        # hand size
    side = rng.choice([-1, 1])                         # which side the raised hand is on
    cx = size / 2 + rng.uniform(-8, 8) * k - side * 6 * k
    cy = rng.uniform(20, 26) * k
    hx = cx + side * rng.uniform(18, 22) * k
    hy = cy + rng.uniform(-6, 2) * k
    image = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(image)
    top = cy + r * 0.9
    d.rounded_rectangle((cx - 11 * k, top, cx + 11 * k, size + 4), radius=4 * k, fill=shirt)          # torso
    d.line((cx + side * 9 * k, top + 5 * k, hx, hy + s * 0.45), fill=shirt, width=max(2, round(5 * k)))  # arm
    draw_face(d, cx, cy, r, skin)
    draw_hand(d, hx, hy, s, skin, mirror=side < 0)
    masks = {"face": _mask(size, lambda m, v: draw_face(m, cx, cy, r, skin, fill=v)),
             "hand": _mask(size, lambda m, v: draw_hand(m, hx, hy, s, skin, fill=v, mirror=side < 0))}
    masks["face"] &= ~masks["hand"]
    hand_word = "right" if side > 0 else "left"
    caption = rng.choice([
        f"a smiling person in a {shirt_name} shirt raising the {hand_word} hand, {bg_name} background",
        f"a person waving, {shirt_name} shirt, {skin_name} skin, {bg_name} background",
        f"a happy person with a raised hand on a {bg_name} background, {shirt_name} shirt",
    ])
    return Picture(image, caption, masks)


def closeup(rng: random.Random, part: str, size: int = 64) -> Picture:
    """A close-up of one face or one hand (the stage-2 data of that expert)."""
    bg_name, bg = _colour(rng, BACKGROUNDS)
    skin_name, skin = _colour(rng, SKINS)
    image = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(image)
    cx, cy = size / 2 + rng.uniform(-5, 5) * size / 64, size / 2 + rng.uniform(-5, 5) * size / 64
    if part == "face":
        r = rng.uniform(20, 26) * size / 64
        draw_face(d, cx, cy, r, skin)
        mask = _mask(size, lambda m, v: draw_face(m, cx, cy, r, skin, fill=v))
        caption = f"a close-up of a smiling face, {skin_name} skin, {bg_name} background"
    else:
        s = rng.uniform(34, 42) * size / 64
        mirror = rng.random() < 0.5
        draw_hand(d, cx, cy + s * 0.1, s, skin, mirror=mirror)
        mask = _mask(size, lambda m, v: draw_hand(m, cx, cy + s * 0.1, s, skin, fill=v, mirror=mirror))
        caption = f"a close-up of an open hand, {skin_name} skin, {bg_name} background"
    empty = np.zeros_like(mask)
    return Picture(image, caption, {"face": mask if part == "face" else empty, "hand": mask if part == "hand" else empty})


SETS = {"scenes": lambda rng, size: scene(rng, size), "faces": lambda rng, size: closeup(rng, "face", size),
        "hands": lambda rng, size: closeup(rng, "hand", size)}


def write_set(folder: Path, kind: str, count: int, seed: int, size: int) -> Path:
    """`count` pictures of `kind` as a kohya image folder (PNG + .caption) with masks in folder/masks/."""
    rng = random.Random(f"{kind}:{seed}")
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        p = SETS[kind](rng, size)
        stem = f"{kind}_{i:04d}"
        p.image.save(folder / f"{stem}.png")
        (folder / f"{stem}.caption").write_text(p.caption)
        for part, m in p.masks.items():
            Image.fromarray((m * 255).astype(np.uint8)).save(folder / "masks" / f"{stem}_{part}.png")
    return folder


def write_dataset_toml(path: Path, image_dir: Path, size: int, batch_size: int, flip: bool = True) -> Path:
    path.write_text(f"[general]\ncaption_extension = \".caption\"\nflip_aug = {str(flip).lower()}\n\n"
                    f"[[datasets]]\nresolution = {size}\nbatch_size = {batch_size}\n\n"
                    f"  [[datasets.subsets]]\n  image_dir = \"{image_dir.name}\"\n")
    return path


def write_world(folder: Path, seed: int = 0, size: int = 64, train: int = 256, closeups: int = 128,
                heldout: int = 48, batch_size: int = 8) -> dict[str, Path]:
    """The whole world: training sets (scenes, faces, hands) with dataset TOMLs, and held-out sets with masks.
    Written once; a folder whose world.json matches these settings is reused."""
    folder = Path(folder)
    settings = {"version": VERSION, "seed": seed, "size": size, "train": train, "closeups": closeups,
                "heldout": heldout, "batch_size": batch_size}
    paths = {name: folder / name for name in ("scenes", "faces", "hands")}
    paths.update({f"heldout_{name}": folder / "heldout" / name for name in ("scenes", "faces", "hands")})
    paths.update({f"{name}_toml": folder / f"{name}.toml" for name in ("scenes", "faces", "hands")})
    marker = folder / "world.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return paths
    counts = {"scenes": train, "faces": closeups, "hands": closeups}
    for name, count in counts.items():
        write_set(paths[name], name, count, seed, size)
        write_set(paths[f"heldout_{name}"], name, heldout, seed + 10_000, size)
        write_dataset_toml(paths[f"{name}_toml"], paths[name], size, batch_size)
    marker.write_text(json.dumps(settings))
    return paths


def load_masks(folder: Path) -> list[tuple[Path, str, dict[str, np.ndarray]]]:
    """(image, caption, {part: mask}) of every picture of a set written by write_set."""
    out = []
    for image in sorted(Path(folder).glob("*.png")):
        masks = {part: np.asarray(Image.open(folder / "masks" / f"{image.stem}_{part}.png")) > 127
                 for part in ("face", "hand")}
        out.append((image, image.with_suffix(".caption").read_text(), masks))
    return out
