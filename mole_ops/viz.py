"""Pictures of gate traces: heat maps, step grids and overlays, as ComfyUI IMAGE tensors (B, H, W, 3) in [0, 1]."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# An inferno-like ramp: dark (gate closed) to bright yellow (gate open).
_ANCHORS = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]) / 255.0


def heat(values: torch.Tensor) -> torch.Tensor:
    """(..., H, W) in [0, 1] -> (..., H, W, 3) colours."""
    v = values.float().clamp(0, 1) * (len(_ANCHORS) - 1)
    low = v.floor().long().clamp(max=len(_ANCHORS) - 2)
    frac = (v - low).unsqueeze(-1)
    return _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac


COLOUR_BAR = 100    # pixels the colour bar and its labels add to the right of a labelled grid
LABEL_MAX = 96      # labels of a labelled grid are 1/12 of a picture's width, 10 to 96 px: legible in a preview


def gate_map_grid(maps: torch.Tensor, cell: int = 96, experts=None, steps=None) -> torch.Tensor:
    """maps (steps, experts, H, W) -> one IMAGE (1, H', W', 3): rows = steps, columns = experts.

    Each cell is the map upscaled (nearest) so its longer side is about `cell` pixels; a 2-pixel gap separates
    cells. With `experts` and `steps` (labels), a header row names the experts, a left column the steps, and a
    colour bar on the right gives the scale (gate 0 = closed to 1 = open) with the shown maps' min and max marked.
    """
    s, n, h, w = maps.shape
    k = max(1, round(cell / max(h, w)))
    cells = F.interpolate(maps.float(), scale_factor=k, mode="nearest")          # (S, N, hk, wk)
    cells = F.pad(heat(cells), (0, 0, 0, 2, 0, 2), value=1.0)                  # white gaps right and below
    grid = cells.permute(0, 2, 1, 3, 4).reshape(s * (h * k + 2), n * (w * k + 2), 3)[:-2, :-2]
    if experts is None or steps is None:
        return grid.unsqueeze(0)
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    top, left = 22, 64
    canvas = Image.new("RGB", (left + grid.shape[1] + COLOUR_BAR, top + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(_bytes(grid)), (left, top))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(experts):
        draw.text((left + j * (w * k + 2) + w * k / 2, top / 2), str(name), fill="black", font=font, anchor="mm")
    for i, step in enumerate(steps):
        draw.text((left / 2, top + i * (h * k + 2) + h * k / 2), f"step {step}", fill="black", font=font,
                  anchor="mm")
    _colour_bar(canvas, draw, left + grid.shape[1] + 8, top, grid.shape[0], float(maps.min()), float(maps.max()))
    return torch.from_numpy(np.asarray(canvas).copy()).float().div(255).unsqueeze(0)


def _bytes(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _colour_bar(canvas, draw, x: int, y: int, height: int, low: float, high: float) -> None:
    """A vertical bar from 1 (top, open) to 0 (bottom, closed), ticks at 0, 0.5 and 1, and the range of the
    shown values marked with min/max."""
    from PIL import Image, ImageFont

    small = ImageFont.load_default(size=11)
    ramp = heat(torch.linspace(1, 0, max(height, 2))[:, None].expand(-1, 12))
    canvas.paste(Image.fromarray(_bytes(ramp)), (x, y))

    def at(value: float) -> float:
        return y + (1 - value) * (height - 1)

    for value in (0.0, 0.5, 1.0):
        draw.line((x + 12, at(value), x + 15, at(value)), fill="black")
        draw.text((x + 17, at(value)), f"{value:g}", fill="black", font=small, anchor="lm")
    for value, label in ((high, "max"), (low, "min")):
        draw.line((x - 3, at(value), x + 12, at(value)), fill=(0, 160, 255), width=2)
    spread = max(at(low) - at(high), 26)
    draw.text((x + 38, at(high)), f"max {high:.2f}", fill=(0, 90, 170), font=small, anchor="lm")
    draw.text((x + 38, at(high) + spread), f"min {low:.2f}", fill=(0, 90, 170), font=small, anchor="lm")


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.55, experts=None) -> torch.Tensor:
    """images (B, Hi, Wi, 3), maps (B, N, H, W) -> (B, Hi, N*Wi, 3): each expert's map blended over the image.

    With `experts` (N names), each panel gets its expert's name above it (labelled_grid: the text scales with the
    picture, legible from a 64-px preview to 1024 px) and the result is one IMAGE (1, H', W', 3).
    """
    b, hi, wi, _ = images.shape
    up = F.interpolate(maps.float(), size=(hi, wi), mode="bilinear", align_corners=False)
    blended = images.float().unsqueeze(1) * (1 - alpha) + heat(up) * alpha      # (B, N, Hi, Wi, 3)
    if experts is not None:
        return labelled_grid([blended[:, j] for j in range(blended.shape[1])], [str(e) for e in experts],
                             columns=blended.shape[1])
    return blended.permute(0, 2, 1, 3, 4).reshape(b, hi, -1, 3)


def labelled_grid(images: list[torch.Tensor], labels: list[str], columns: int) -> torch.Tensor:
    """IMAGEs (B, H, W, 3) -> one IMAGE grid (1, H', W', 3), every image with its label above it.

    Images of another size than the first are resized to it; a batch contributes each of its images, all
    under its label.
    """
    from PIL import Image, ImageDraw, ImageFont

    first = images[0]
    h, w = first.shape[1:3]
    cells, names = [], []
    for image, label in zip(images, labels):
        if image.shape[1:3] != (h, w):
            image = F.interpolate(image.movedim(-1, 1).float(), size=(h, w), mode="bilinear",
                                  align_corners=False).movedim(1, -1)
        for b in range(image.shape[0]):
            cells.append(image[b])
            names.append(label)
    font = ImageFont.load_default(size=max(10, min(LABEL_MAX, w // 12)))
    band = int(font.size * 1.6)
    columns = max(1, min(columns, len(cells)))
    rows = -(-len(cells) // columns)
    gap = 4
    canvas = Image.new("RGB", (columns * (w + gap) - gap, rows * (h + band + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (cell, name) in enumerate(zip(cells, names)):
        x, y = (i % columns) * (w + gap), (i // columns) * (h + band + gap)
        pixels = (cell.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        canvas.paste(Image.fromarray(pixels), (x, y + band))
        draw.text((x + w / 2, y + band / 2), name, fill="black", font=font, anchor="mm")
    return torch.from_numpy(np.asarray(canvas).copy()).float().div(255).unsqueeze(0)
