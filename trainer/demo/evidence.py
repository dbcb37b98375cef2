"""What the demo measures on held-out pictures of the synthetic world (never used in training), as SPEC.md
section 7 lays out; numbers are reported whatever they show.

- Local gates: ROC AUC of each expert's local-gate map (averaged over image-token layers, at latent resolution)
  against the face and the hand masks (matching and crossed), and identity AUC inside glyph cells (does face gate
  minus hand gate tell face cells from hand cells), per timestep and averaged; with untrained gates as control.
  A latent cell counts as a part when at least half of its pixels belong to it, as background when none do;
  partly covered cells are left out.
- Global gates: mean global gate of each expert on face close-ups and on hand close-ups.
- The VAE: PSNR of its reconstructions of the held-out scenes (how much detail any model can show at all).

The held-out denoising loss of every model (overall and per region) is the in-world evaluation's
(benchmarks/evaluate.py, run by the pipeline); the report puts both together.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...mole_ops.hooks import HookState, attached
from ...mole_ops.mixture import build
from ...mole_ops.ops import GateSettings
from ...mole_ops.trace import COND, GateTrace
from ..training.data import load_image
from ..training.evaluation import batches, cell_fractions, image_size
from .world import load_masks

TIMESTEPS = (800, 500, 200)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) statistic, ties averaged; nan without both classes."""
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):            # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def cell_labels(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Fraction of each latent cell covered by the mask: (h, w) in [0, 1]."""
    return cell_fractions(mask.astype(np.float32), hw).numpy()


@dataclass
class Sample:
    image: Path
    caption: str
    masks: dict


@torch.no_grad()
def gate_maps(base, mole, samples: list[Sample], seed: int, batch: int = 8, settings=None):
    """Per sample: local maps (T, N, h, w) and global gates (T, N) at the TIMESTEPS, fixed noise per sample."""
    trace_state = HookState(settings or GateSettings("both"))
    local, glob = [], []
    with attached(base.model, mole, trace_state):
        for group in batches(samples, batch):
            pixels = torch.stack([load_image(s.image, image_size(s.image)) for s in group])
            x0 = base.encode_images(pixels)
            cond = base.encode_text([s.caption for s in group], image_size(group[0].image))
            gen = torch.Generator().manual_seed(seed)
            trace = GateTrace(mole.order)
            trace_state.trace = trace
            for k, t in enumerate(TIMESTEPS):
                noise = torch.randn(x0.shape, generator=gen)
                tt = torch.full((len(group),), t)
                trace.begin_call(k, tuple(x0.shape[-2:]), [COND] * len(group))
                base.predict(base.noisy(x0, noise, tt), tt, cond)
                trace.end_call()
            local.append(trace.local_maps(COND).transpose(0, 1))      # (B, T, N, h, w)
            glob.append(trace.global_curve(COND).transpose(0, 1))     # (B, T, N)
    return torch.cat(local).numpy(), torch.cat(glob).numpy()


def local_gate_report(maps: np.ndarray, samples: list[Sample], order: tuple[str, ...],
                      labels: tuple[str, ...] | None = None) -> dict:
    """AUCs per timestep ('t=800', ...; or per `labels`, one for each of the maps' second axis) and for their mean
    ('mean')."""
    h, w = maps.shape[-2:]
    fractions = {part: np.stack([cell_labels(s.masks[part], (h, w)) for s in samples]) for part in ("face", "hand")}
    fi, hi = order.index("face"), order.index("hand")
    out = {}
    labels = labels or tuple(f"t={t}" for t in TIMESTEPS)
    views = {label: maps[:, k] for k, label in enumerate(labels)}
    views["mean"] = maps.mean(axis=1)
    for name, m in views.items():            # m: (samples, N, h, w)
        row = {}
        for expert, ei in (("face", fi), ("hand", hi)):
            for part in ("face", "hand"):
                frac = fractions[part].reshape(-1)
                keep = (frac >= 0.5) | (frac == 0)
                row[f"{expert} map vs {part} mask"] = auc(m[:, ei].reshape(-1)[keep], (frac >= 0.5)[keep])
        face_f, hand_f = fractions["face"].reshape(-1), fractions["hand"].reshape(-1)
        inside = (face_f >= 0.5) | (hand_f >= 0.5)
        diff = (m[:, fi] - m[:, hi]).reshape(-1)
        row["identity (face - hand) in glyphs"] = auc(diff[inside], (face_f >= 0.5)[inside])
        out[name] = row
    return out


@torch.no_grad()
def vae_psnr(base, samples: list[Sample], batch: int = 8) -> dict:
    """PSNR (dB, pixels in [0, 1]) of encode-then-decode on the pictures: mean over pictures and its s.e."""
    values = []
    for group in batches(samples, batch):
        size = image_size(group[0].image)
        pixels = torch.stack([load_image(s.image, size) for s in group])
        back = base.decode(base.encode_images(pixels)).float().clamp(0, 1).reshape(pixels.shape)
        mse = ((back - pixels) ** 2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
        values += (10 * torch.log10(1 / mse)).tolist()
    v = np.array(values)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan"),
            "pictures": len(v)}


def samples_of(folder: Path, limit: int | None = None) -> list[Sample]:
    return [Sample(i, c, m) for i, c, m in load_masks(folder)][:limit]


def measure(stage1: Path, experts: list, gates, world: dict, seed: int = 0, limit: int | None = None) -> dict:
    """The gate figures of the report (see the module docstring)."""
    from ..training.model import Base

    scenes = samples_of(world["heldout_scenes"], limit)
    faces, hands = samples_of(world["heldout_faces"], limit), samples_of(world["heldout_hands"], limit)
    results = {}
    base = Base(stage1)
    trained = build(experts, gates, base.layout)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        untrained = build(experts, None, base.layout)
    results["vae_psnr"] = vae_psnr(base, scenes)
    maps, _ = gate_maps(base, trained, scenes, seed)
    results["local"] = local_gate_report(maps, scenes, trained.order)
    control, _ = gate_maps(base, untrained, scenes, seed)
    results["local_untrained"] = local_gate_report(control, scenes, untrained.order)
    results["global"] = {}
    for name, group in (("face close-ups", faces), ("hand close-ups", hands)):
        _, glob = gate_maps(base, trained, group, seed)
        results["global"][name] = {e: float(glob[:, :, i].mean()) for i, e in enumerate(trained.order)}
    results["example"] = {"maps": maps[:4].mean(axis=1), "images": [str(s.image) for s in scenes[:4]]}
    return results
