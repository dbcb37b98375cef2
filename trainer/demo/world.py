"""A synthetic human-centric world with known ground truth, for the demo and for measuring the gates.

Scenes: a stylised person (torso, a raised arm) with a face (a skin-coloured disc with hair, eyes and a smile) and a
raised hand (a palm with four fingers, a thumb, knuckle lines and a cuff) at varied positions, sizes and colours,
on a coloured background; a caption from templates naming what is there; pixel masks of the face and the hand.
The parts are large (the face about 3 latent cells across at 64 px, the hand about 2.5) and told apart by more
than their shared skin tone: hair and a face's features against fingers, dark lines between them and over the
knuckles, and a cuff. Since world version 3 a hand's detail is about as strong as a face's (`detail_contrast`):
in version 2 it was a third of it in pixels and a sixth in the VAE's latents.

Detail is what the experts must bring (since world version 2): stage 1 learns from "plain" scenes whose face is a bare
skin disc and whose hand is a mitten (same silhouettes, no features), while the experts learn from detailed scenes
and close-ups with their loss masked to their own part, and the held-out pictures are detailed. So an expert
knows something about its part that the base does not, which is what a gate can learn to switch on there.
Close-ups: one detailed face or hand filling most of the picture. Everything is drawn with PIL from a seed.

`write_world(folder, seed, ...)` writes kohya datasets (images + `.caption` files + dataset TOMLs, and for the
experts mask folders named like the images) and held-out sets with masks for the evidence. Nothing is
downloaded.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = 3
BACKGROUNDS = {"blue": (52, 84, 178), "green": (60, 140, 72), "purple": (112, 64, 150), "grey": (120, 120, 124),
               "orange": (214, 120, 40), "teal": (40, 140, 140)}
SHIRTS = {"red": (200, 40, 44), "yellow": (228, 200, 48), "white": (236, 236, 236), "black": (28, 28, 32),
          "pink": (230, 120, 170)}
SKINS = {"light": (240, 200, 170), "tan": (208, 160, 112), "brown": (150, 100, 64), "dark": (96, 62, 40)}
HAIRS = {"black": (24, 20, 20), "brown": (92, 56, 30), "blonde": (226, 196, 110), "red": (170, 60, 30)}
PARTS = ("face", "hand")
HAND_LINES = ("dark", "light")      # the hand's detail lines: the world's dark ones, or light (a study, issue 27)
LIGHT_LINES = (250, 248, 240)


@dataclass
class Picture:
    image: Image.Image
    caption: str
    masks: dict[str, np.ndarray]        # "face"/"hand" -> (H, W) bool
    person: np.ndarray | None = None    # (H, W) bool: everything of the person (torso, arm, face, hand)


def _colour(rng: random.Random, table: dict, avoid: str | None = None) -> tuple[str, tuple]:
    name = rng.choice(sorted(n for n in table if n != avoid))
    jitter = [rng.randint(-12, 12) for _ in range(3)]
    return name, tuple(max(0, min(255, c + j)) for c, j in zip(table[name], jitter))


def _mask(size: int, draw_fn) -> np.ndarray:
    m = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(m), 255)
    return np.asarray(m) > 127


def draw_face(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, skin, hair=None, fill=None,
              detailed: bool = True) -> None:
    """A face: a disc with, when detailed, hair over its top, two eyes and a smile. With `fill`, only the
    silhouette (for the mask)."""
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill or skin)
    if fill is not None or not detailed:
        return
    if hair is not None:
        d.chord((cx - r, cy - r, cx + r, cy + r), 200, 340, fill=hair)
    e = max(1.0, r * 0.14)
    for sx in (-1, 1):
        ex, ey = cx + sx * r * 0.38, cy - r * 0.05
        d.ellipse((ex - e, ey - e, ex + e, ey + e), fill=(20, 20, 24))
    d.arc((cx - r * 0.48, cy - r * 0.05, cx + r * 0.48, cy + r * 0.6), 20, 160, fill=(120, 30, 40),
          width=max(1, round(r * 0.12)))


def draw_hand(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, skin, fill=None, mirror=False,
              detailed: bool = True, cuff=None, lines: str = "dark") -> None:
    """A hand of size s: a palm, four fingers up and a thumb to one side; when detailed, knuckle lines and a cuff
    at the wrist, else a mitten (the same silhouette in one piece, no fingers). `lines` (HAND_LINES): the lines'
    tone, dark (the world's) or light (the contrary-detail study: a face's dark marks are wrong on such a hand)."""
    colour = fill or skin
    sign = -1 if mirror else 1
    x0, x1 = cx + sign * s * 0.28, cx + sign * s * 0.55
    fw = s * 0.14
    if not detailed:          # a mitten: the fingers' and the palm's box in one rounded piece, and the thumb
        d.rounded_rectangle((cx - s * 0.35, cy - s * 0.55, cx + s * 0.35, cy + s * 0.5), radius=s * 0.2, fill=colour)
        d.rounded_rectangle((min(x0, x1), cy + s * 0.05, max(x0, x1), cy + s * 0.22), radius=fw * 0.4, fill=colour)
        return
    # detail as coarse as a face's hair (world version 3): dark lines between the fingers and over the knuckles
    # and a tall cuff, so that a detailed hand differs from a mitten about as much as a detailed face differs from
    # a bare disc (detail_contrast measures it)
    d.rounded_rectangle((cx - s * 0.35, cy - s * 0.1, cx + s * 0.35, cy + s * 0.5), radius=s * 0.12, fill=colour)
    for i in range(4):
        fx = cx - s * 0.3 + i * s * 0.2
        length = s * (0.45 if i in (1, 2) else 0.36)
        d.rounded_rectangle((fx - fw / 2 + fw * 0.1, cy - s * 0.1 - length, fx + fw / 2, cy), radius=fw * 0.45,
                            fill=colour)
    d.rounded_rectangle((min(x0, x1), cy + s * 0.05, max(x0, x1), cy + s * 0.22), radius=fw * 0.4, fill=colour)
    if fill is None:
        if lines not in HAND_LINES:
            raise ValueError(f"hand lines {lines!r} are not one of {', '.join(HAND_LINES)}")
        dark = tuple(int(c * 0.5) for c in skin) if lines == "dark" else LIGHT_LINES
        line = max(1, round(s * 0.06))
        for i in range(3):
            gap = cx - s * 0.3 + i * s * 0.2 + s * 0.1
            d.line((gap, cy - s * 0.42, gap, cy - s * 0.05), fill=dark, width=line)      # between the fingers
            x = cx - s * 0.2 + i * s * 0.2
            d.line((x, cy + s * 0.02, x, cy + s * 0.22), fill=dark, width=line)          # knuckles
        if cuff is not None:
            d.rectangle((cx - s * 0.35, cy + s * 0.3, cx + s * 0.35, cy + s * 0.5), fill=cuff)


def scene(rng: random.Random, size: int = 64, detailed: bool | tuple[str, ...] = True,
          hand_lines: str = "dark") -> Picture:
    """A person with a face and one raised hand at head height, clearly apart. `detailed=False`: the plain
    scenes of stage 1 (bare face, mitten); a tuple of parts: only those detailed (the others plain). `hand_lines`:
    see draw_hand (the same picture otherwise, from the same generator state)."""
    detail = {part: (part in detailed) if isinstance(detailed, tuple) else bool(detailed) for part in PARTS}
    bg_name, bg = _colour(rng, BACKGROUNDS)
    shirt_name, shirt = _colour(rng, SHIRTS)
    skin_name, skin = _colour(rng, SKINS)
    _, hair = _colour(rng, HAIRS)
    k = size / 64
    r = rng.uniform(11, 13.5) * k                      # face radius: about 3 latent cells across
    s = rng.uniform(19, 23) * k                        # hand size
    side = rng.choice([-1, 1])                         # which side the raised hand is on
    cx = size / 2 - side * rng.uniform(9, 12) * k
    cy = rng.uniform(17, 22) * k
    hx = cx + side * (r + s * 0.45 + rng.uniform(3, 6) * k)
    hx = min(max(hx, s * 0.6), size - s * 0.6)
    hy = cy + rng.uniform(-3, 3) * k
    image = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(image)
    top = cy + r * 0.9
    d.rounded_rectangle((cx - 12 * k, top, cx + 12 * k, size + 4), radius=4 * k, fill=shirt)          # torso
    d.line((cx + side * 9 * k, top + 5 * k, hx, hy + s * 0.5), fill=shirt, width=max(2, round(5 * k)))  # arm
    draw_face(d, cx, cy, r, skin, hair, detailed=detail["face"])
    draw_hand(d, hx, hy, s, skin, mirror=side < 0, detailed=detail["hand"], cuff=shirt, lines=hand_lines)
    masks = {"face": _mask(size, lambda m, v: draw_face(m, cx, cy, r, skin, fill=v)),
             "hand": _mask(size, lambda m, v: draw_hand(m, hx, hy, s, skin, fill=v, mirror=side < 0,
                                                        detailed=detail["hand"]))}
    masks["face"] &= ~masks["hand"]

    def body(m, v):
        m.rounded_rectangle((cx - 12 * k, top, cx + 12 * k, size + 4), radius=4 * k, fill=v)
        m.line((cx + side * 9 * k, top + 5 * k, hx, hy + s * 0.5), fill=v, width=max(2, round(5 * k)))
    person = _mask(size, body) | masks["face"] | masks["hand"]
    hand_word = "right" if side > 0 else "left"
    caption = rng.choice([
        f"a smiling person in a {shirt_name} shirt raising the {hand_word} hand, {bg_name} background",
        f"a person waving, {shirt_name} shirt, {skin_name} skin, {bg_name} background",
        f"a happy person with a raised hand on a {bg_name} background, {shirt_name} shirt",
    ])
    return Picture(image, caption, masks, person)


def closeup(rng: random.Random, part: str, size: int = 64, hand_lines: str = "dark") -> Picture:
    """A detailed close-up of one face or one hand (expert data of that part); `hand_lines`: see draw_hand."""
    bg_name, bg = _colour(rng, BACKGROUNDS)
    skin_name, skin = _colour(rng, SKINS)
    _, hair = _colour(rng, HAIRS)
    _, cuff = _colour(rng, SHIRTS)
    image = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(image)
    cx, cy = size / 2 + rng.uniform(-5, 5) * size / 64, size / 2 + rng.uniform(-5, 5) * size / 64
    if part == "face":
        r = rng.uniform(20, 26) * size / 64
        draw_face(d, cx, cy, r, skin, hair)
        mask = _mask(size, lambda m, v: draw_face(m, cx, cy, r, skin, fill=v))
        caption = f"a close-up of a smiling face, {skin_name} skin, {bg_name} background"
    else:
        s = rng.uniform(34, 42) * size / 64
        mirror = rng.random() < 0.5
        draw_hand(d, cx, cy + s * 0.1, s, skin, mirror=mirror, cuff=cuff, lines=hand_lines)
        mask = _mask(size, lambda m, v: draw_hand(m, cx, cy + s * 0.1, s, skin, fill=v, mirror=mirror))
        caption = f"a close-up of an open hand, {skin_name} skin, {bg_name} background"
    empty = np.zeros_like(mask)
    return Picture(image, caption, {"face": mask if part == "face" else empty, "hand": mask if part == "hand" else empty},
                   mask)


SETS = {"scenes": lambda rng, size, **k: scene(rng, size, **k),
        "plain": lambda rng, size, **k: scene(rng, size, detailed=False, **k),
        "faces": lambda rng, size, **k: closeup(rng, "face", size, **k),
        "hands": lambda rng, size, **k: closeup(rng, "hand", size, **k),
        "face_scenes": lambda rng, size, **k: scene(rng, size, detailed=("face",), **k),
        "hand_scenes": lambda rng, size, **k: scene(rng, size, detailed=("hand",), **k)}


def detail_contrast(seed: int = 0, count: int = 48, size: int = 64, hand_lines: str = "dark") -> dict[str, float]:
    """Per part, the mean squared pixel difference (pixels in [0, 1]) inside the part between detailed scenes and
    the same scenes drawn plain: how much an expert of that part has to learn beyond stage 1. A part whose detail
    is much fainter than the other's (world version 2's hands: a third of the face's in pixels, a sixth at latent
    resolution) leaves its expert little of its own to learn. The parts' masks are the detailed silhouettes."""
    rng = random.Random(f"contrast:{seed}")
    sums = {part: 0.0 for part in PARTS}
    for _ in range(count):
        state = rng.getstate()
        detailed = scene(rng, size, hand_lines=hand_lines)
        again = random.Random()
        again.setstate(state)
        plain = scene(again, size, detailed=False)
        diff = ((np.asarray(detailed.image, np.float32) - np.asarray(plain.image, np.float32)) / 255) ** 2
        for part in PARTS:
            sums[part] += float(diff.mean(-1)[detailed.masks[part]].mean())
    return {part: v / count for part, v in sums.items()}


def write_set(folder: Path, kind: str, count: int, seed: int, size: int, hand_lines: str = "dark") -> Path:
    """`count` pictures of `kind` as a kohya image folder (PNG + .caption), with masks in folder/masks/
    (<stem>_<part>.png, for the evidence) and folder/<part>_masks/ (<stem>.png: kohya's conditioning_data_dir for
    a loss masked to that part); `hand_lines`: see draw_hand."""
    rng = random.Random(f"{kind}:{seed}")
    for sub in ("masks", *(f"{part}_masks" for part in PARTS)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        p = SETS[kind](rng, size, hand_lines=hand_lines)
        stem = f"{kind}_{i:04d}"
        p.image.save(folder / f"{stem}.png")
        (folder / f"{stem}.caption").write_text(p.caption)
        for part, m in p.masks.items():
            mask = Image.fromarray((m * 255).astype(np.uint8))
            mask.save(folder / "masks" / f"{stem}_{part}.png")
            mask.save(folder / f"{part}_masks" / f"{stem}.png")
    return folder


def write_dataset_toml(path: Path, subsets: dict[str, str | None], size: int, batch_size: int,
                       flip: bool = True) -> Path:
    """A kohya dataset TOML of image folders (names relative to the TOML), each with its loss-mask folder or
    None."""
    text = (f"[general]\ncaption_extension = \".caption\"\nflip_aug = {str(flip).lower()}\n\n"
            f"[[datasets]]\nresolution = {size}\nbatch_size = {batch_size}\n")
    for image_dir, masks in subsets.items():
        text += f"\n  [[datasets.subsets]]\n  image_dir = \"{image_dir}\"\n"
        if masks:
            text += f"  conditioning_data_dir = \"{masks}\"\n"
    path.write_text(text)
    return path


def write_world(folder: Path, seed: int = 0, size: int = 64, train: int = 256, closeups: int = 128,
                heldout: int = 48, batch_size: int = 8) -> dict[str, Path]:
    """The whole world: training sets (plain scenes for stage 1; detailed scenes, faces and hands) with dataset
    TOMLs (plain: stage 1; face_expert and hand_expert: detailed scenes and close-ups with the loss masked to the
    part; scenes: the gates), and detailed held-out sets with masks. Written once; a folder whose world.json
    matches these settings is reused."""
    folder = Path(folder)
    settings = {"version": VERSION, "seed": seed, "size": size, "train": train, "closeups": closeups,
                "heldout": heldout, "batch_size": batch_size}
    paths = {name: folder / name for name in ("plain", "scenes", "faces", "hands")}
    paths.update({f"heldout_{name}": folder / "heldout" / name for name in ("scenes", "faces", "hands")})
    tomls = {"plain": {"plain": None}, "scenes": {"scenes": None},
             "face_expert": {"scenes": "scenes/face_masks", "faces": "faces/face_masks"},
             "hand_expert": {"scenes": "scenes/hand_masks", "hands": "hands/hand_masks"}}
    paths.update({f"{name}_toml": folder / f"{name}.toml" for name in tomls})
    marker = folder / "world.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return paths
    counts = {"plain": train, "scenes": train, "faces": closeups, "hands": closeups}
    for name, count in counts.items():
        write_set(paths[name], name, count, seed, size)
        if name != "plain":
            write_set(paths[f"heldout_{name}"], name, heldout, seed + 10_000, size)
    for name, subsets in tomls.items():
        write_dataset_toml(paths[f"{name}_toml"], subsets, size, batch_size)
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
