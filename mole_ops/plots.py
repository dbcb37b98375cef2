"""Line plots (gate curves, loss curves) rendered with matplotlib's Agg backend to RGB arrays or PNG files.

matplotlib is imported when a plot is drawn, so importing mole_ops stays light.
"""
from __future__ import annotations

import numpy as np
import torch


def _figure(width_px: int, height_px: int):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    dpi = 100
    return Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)


def _rgb(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def line_plot(series: dict[str, list[float] | np.ndarray], x=None, *, title: str, xlabel: str, ylabel: str,
              ylim: tuple[float, float] | None = None, size: tuple[int, int] = (640, 400),
              logy: bool = False) -> np.ndarray:
    """One line per named series -> (H, W, 3) uint8 RGB image."""
    fig = _figure(*size)
    ax = fig.add_subplot(1, 1, 1)
    for name, ys in series.items():
        ys = np.asarray(ys, dtype=float)
        xs = np.arange(len(ys)) if x is None else np.asarray(x)
        ax.plot(xs, ys, marker="o" if len(ys) <= 60 else None, markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    return _rgb(fig)


def histogram(values, *, title: str, xlabel: str, bins: int = 30, size=(640, 400), marks=(),
              ylabel: str = "prompts") -> np.ndarray:
    """A histogram (H, W, 3) uint8, with vertical lines at `marks` (e.g. quartile edges)."""
    fig = _figure(*size)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(np.asarray(values, dtype=float), bins=bins, color="#4c72b0")
    for m in marks:
        ax.axvline(m, color="#dd8452", linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return _rgb(fig)


def bars(values: dict[str, float], errors: dict[str, float] | None = None, *, title: str, ylabel: str,
         size=(640, 400)) -> np.ndarray:
    """A bar chart (H, W, 3) uint8 of named values, with optional error bars."""
    fig = _figure(*size)
    ax = fig.add_subplot(1, 1, 1)
    names = list(values)
    ax.bar(names, [values[n] for n in names], yerr=[errors[n] for n in names] if errors else None,
           color="#4c72b0", capsize=3)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=30 if len(names) > 4 else 0)
    fig.tight_layout()
    return _rgb(fig)


def grouped_bars(groups: dict[str, dict[str, float]], *, title: str, ylabel: str, size=(640, 400)) -> np.ndarray:
    """Bars per group (e.g. per expert) for each named series within it (e.g. per region), with a zero line:
    (H, W, 3) uint8."""
    fig = _figure(*size)
    ax = fig.add_subplot(1, 1, 1)
    names = list(groups)
    series = list(dict.fromkeys(k for g in groups.values() for k in g))
    width = 0.8 / max(len(series), 1)
    for j, label in enumerate(series):
        xs = np.arange(len(names)) + (j - (len(series) - 1) / 2) * width
        ax.bar(xs, [groups[n].get(label, np.nan) for n in names], width, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _rgb(fig)


def gate_curves(curve: torch.Tensor, experts: tuple[str, ...], steps: list[int], title: str) -> torch.Tensor:
    """curve (steps, N) mean global gate per step -> IMAGE (1, H, W, 3) in [0, 1] (the paper's Fig. 7 a-c)."""
    series = {name: curve[:, i].tolist() for i, name in enumerate(experts)}
    rgb = line_plot(series, steps, title=title, xlabel="sampling step", ylabel="mean global gate", ylim=(0.0, 1.0))
    return torch.from_numpy(rgb).float().div(255).unsqueeze(0)


def save_png(rgb: np.ndarray, path: str) -> None:
    """Write an (H, W, 3) uint8 image atomically (temp file, then rename)."""
    import os
    import tempfile

    from PIL import Image

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    try:
        Image.fromarray(rgb).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
