"""Faces, hands and people in a user's photographs, for `prepare`: the detector (mediapipe's bundled models, run in
its own environment by detector_worker.py and spoken to as JSON lines, loaded once), the region masks made from
its detections, and square close-ups around them.

Masks: a face is the ellipse inscribed in its box grown by `margin` of its size on every side (a face box of
BlazeFace runs from the brows to the chin); a hand is the convex hull of its 21 landmarks grown by `margin` around
their centre (the fingers' tips are landmarks, so the hull holds the whole hand). White = the part.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...mole_ops.atomic import replacing
from .config import ConfigError
from .side_process import SideProcess

WORKER = Path(__file__).with_name("detector_worker.py")
DEFAULT_PYTHON = Path(__file__).resolve().parents[2] / ".venv-detector" / "bin" / "python"
PARTS = ("face", "hand")


@dataclass
class Found:
    """What the detector found in one picture: {part: [{"box", "score", ("points")}]}, or why it could not look."""

    size: tuple[int, int] = (0, 0)
    parts: dict[str, list[dict]] = field(default_factory=dict)
    error: str = ""


class Detector:
    """The detector process (scripts/detector-env.sh's Python running detector_worker.py)."""

    def __init__(self, python: Path = DEFAULT_PYTHON, thresholds: dict[str, float] | None = None,
                 worker: Path = WORKER):
        if not Path(python).is_file():
            raise ConfigError(f"--detector_python {python}: no such file (build the detector's environment: "
                              "make detector-env, or bash scripts/detector-env.sh)")
        self.thresholds = dict(thresholds or {})
        self.side = SideProcess([str(python), str(worker)], "the detector did not start", ConfigError)
        self.version = self.side.ready.get("mediapipe", "")

    def find(self, image: Path, parts: list[str]) -> Found:
        reply = self.side.ask({"image": str(image), "find": list(parts), "threshold": self.thresholds})
        if "error" in reply:
            return Found(error=reply["error"])
        return Found(tuple(reply["size"]), {p: reply.get(p, []) for p in parts})

    def close(self) -> None:
        self.side.close()

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def grown_box(box, margin: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return x0 - dx, y0 - dy, x1 + dx, y1 + dy


def region_mask(size: tuple[int, int], detections: list[dict], part: str, margin: float = 0.15) -> np.ndarray:
    """(H, W) bool mask of `part` from its detections (see the module docstring)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for d in detections:
        if part == "hand" and d.get("points"):
            points = np.asarray(d["points"], dtype=np.float64)
            centre = points.mean(axis=0)
            hull = _hull(centre + (points - centre) * (1 + margin))
            draw.polygon([tuple(p) for p in hull], fill=255)
        else:
            draw.ellipse(grown_box(d["box"], margin), fill=255)
    return np.asarray(canvas) > 127


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of (N, 2) points, counter-clockwise."""
    pts = sorted(map(tuple, points))
    if len(pts) < 3:
        return np.asarray(pts)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1])


def save_mask(path: Path, mask: np.ndarray) -> Path:
    """A mask as a grayscale PNG (white = the region), written to a temp file and renamed."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(tmp, format="PNG")
    return path


def write_masks(out: Path, key: str, masks: dict[str, np.ndarray]) -> list[Path]:
    """Where the trainer and the checks read region masks, for one picture `key`:
    `masks/<key>_<region>.png` (expert-effect's and evaluate --heldout's --masks), `masks_<region>/<key>.png`
    (the conditioning_data_dir of that region's expert for --masked_loss) and `masks_all/<key>.png` (their union,
    for one masked dataset). Returns the files written."""
    written = []
    for region, mask in masks.items():
        written.append(save_mask(out / "masks" / f"{key}_{region}.png", mask))
        written.append(save_mask(out / f"masks_{region}" / f"{key}.png", mask))
    union = np.zeros_like(next(iter(masks.values()))) if masks else None
    for mask in masks.values():
        union |= mask
    if union is not None:
        written.append(save_mask(out / "masks_all" / f"{key}.png", union))
    return written


def closeup_window(box, size: tuple[int, int], context: float = 1.0) -> tuple[int, int, int]:
    """(left, top, side) of the square around a detection: its longer side plus `context` of it (half on each
    side), centred on it; it may reach outside the picture (that part is padded)."""
    x0, y0, x1, y1 = box
    side = round(max(x1 - x0, y1 - y0) * (1 + context))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return round(cx - side / 2), round(cy - side / 2), max(1, side)


def crop_padded(image, window: tuple[int, int, int], out_size: int, fill=(0, 0, 0)):
    """The square `window` of a PIL image, padded with `fill` where it leaves the picture, resized to out_size
    (square to square: never stretched)."""
    from PIL import Image

    left, top, side = window
    canvas = Image.new(image.mode, (side, side), fill if image.mode == "RGB" else 0)
    canvas.paste(image, (-left, -top))
    return canvas.resize((out_size, out_size), Image.Resampling.LANCZOS if image.mode == "RGB" else
                         Image.Resampling.BILINEAR)
