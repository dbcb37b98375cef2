"""Does each expert help its own part more than the others? The precondition for gates (SPEC.md section 7),
measured before any gate trains:

    python -m trainer expert-effect --pretrained_model_name_or_path stage1.safetensors \\
        --experts face=face.safetensors hand=hand.safetensors --images heldout/ --output_dir effect/

For held-out images (caption files beside them) with region masks (`<masks>/<stem>_<region>.png`, any region names:
face, hand, ... from a detector, or the demo world's), each expert alone at fixed scale is compared with the base
at chosen timesteps and fixed noise: per latent cell, the change in eps-prediction error (mean over channels of
(eps_hat - eps)^2, expert minus base), averaged over the cells of each region (a cell is a region's when at least
half of it is covered) and over the background (cells no region touches). Negative = the expert lowers the error
there. An expert named like a region passes when it lowers the error on its own region more than on every other
region (its own delta is the smallest), per timestep and on the mean over timesteps; its margin (the smallest other
region's delta minus its own) comes with a 95% bootstrap interval over pictures, so a pass or a fail within the
noise of the pictures is said to be one. Content-aware gates also need the cross-effect: what each expert does to
the other parts' cells, with its interval; where it helps them too, nothing pushes a gate to close it there (opening
both experts is nearly as good), and only where it hurts does a gate have a reason to close it. Writes
expert_effect.json, expert_effect.md (the table, verdicts and cross-effects) and expert_effect.png (a bar plot).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...mole_ops.atomic import write_text
from ...mole_ops.errors import MoLEError
from .config import ConfigError
from .data import IMAGE_EXTENSIONS, load_image
from .evaluation import batches, cell_fractions

log = logging.getLogger("mole.trainer")
BACKGROUND = "background"
TIMESTEPS = (800, 500, 200)


@dataclass
class Picture:
    image: Path
    caption: str
    masks: dict[str, np.ndarray]      # region -> (H, W) bool, at the image's own size


def read_pictures(images: Path, masks: Path, caption_extension: str = ".caption") -> list[Picture]:
    """Every image of `images` with a caption file, and its region masks `<masks>/<stem>_<region>.png`."""
    from PIL import Image

    if not images.is_dir():
        raise ConfigError(f"--images {images}: no such folder")
    if not masks.is_dir():
        raise ConfigError(f"--masks {masks}: no such folder (region masks named <image stem>_<region>.png)")
    out = []
    for path in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        caption = path.with_suffix(caption_extension)
        if not caption.exists():
            continue
        regions = {}
        for mask in sorted(masks.glob(f"{path.stem}_*.png")):
            with Image.open(mask) as im:
                regions[mask.stem[len(path.stem) + 1:]] = np.asarray(im.convert("L")) > 127
        out.append(Picture(path, caption.read_text().strip(), regions))
    if not out:
        raise ConfigError(f"--images {images}: no image with a caption file ({caption_extension})")
    if not any(p.masks for p in out):
        raise ConfigError(f"--masks {masks}: no region mask for any image (expected <image stem>_<region>.png)")
    return out


def region_cells(picture: Picture, regions: list[str], hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """{region or background: (h, w) bool}: cells at least half covered by the region; background = cells no
    region touches."""
    fractions = {r: cell_fractions(picture.masks[r], hw) if r in picture.masks else torch.zeros(hw)
                 for r in regions}
    cells = {r: f >= 0.5 for r, f in fractions.items()}
    cells[BACKGROUND] = torch.stack(list(fractions.values())).sum(0) == 0 if fractions else torch.ones(hw, dtype=bool)
    return cells


@torch.no_grad()
def measure(base, experts: list, pictures: list[Picture], timesteps=TIMESTEPS, seed: int = 0, batch: int = 8,
            size: tuple[int, int] | None = None, strength: float = 1.0) -> dict:
    """Mean per-cell error of the base and change made by each expert alone, per region and timestep."""
    from ...mole_ops.hooks import HookState, attached
    from ...mole_ops.mixture import build
    from ...mole_ops.ops import GateSettings
    from .evaluation import image_size

    regions = sorted({r for p in pictures for r in p.masks})
    names = [*regions, BACKGROUND]
    moles = {e.name: build([e], None, base.layout) for e in experts}
    sums = {who: {t: {r: 0.0 for r in names} for t in timesteps} for who in ["base", *moles]}
    counts = {t: {r: 0 for r in names} for t in timesteps}
    # per picture and region, for intervals over pictures: cell counts and error sums per model and timestep
    picture_counts, picture_sums = [], {who: {t: [] for t in timesteps} for who in sums}
    for group in batches(pictures, batch):
        group_size = size or image_size(group[0].image)
        x0 = base.encode_images(torch.stack([load_image(p.image, group_size) for p in group]))
        cond = base.encode_text([p.caption for p in group], group_size)
        hw = tuple(x0.shape[-2:])
        cells = [region_cells(p, regions, hw) for p in group]
        gen = torch.Generator().manual_seed(seed)
        noises = [torch.randn(x0.shape, generator=gen) for _ in timesteps]
        errors = {}
        for who, mole in [("base", None), *moles.items()]:
            with attached(base.model, mole, HookState(GateSettings("none", {who: strength}))):
                for t, noise in zip(timesteps, noises):
                    tt = torch.full((len(group),), t)
                    eps = base.predict(base.noisy(x0, noise, tt), tt, cond)
                    errors[who, t] = ((eps.float() - noise.float()) ** 2).mean(dim=1).cpu()      # (B, h, w)
        picture_counts += [[int(c[r].sum()) for r in names] for c in cells]
        for t in timesteps:
            for i, c in enumerate(cells):
                for r in names:
                    counts[t][r] += int(c[r].sum())
                    for who in sums:
                        sums[who][t][r] += float(errors[who, t][i][c[r]].sum())
                for who in sums:
                    picture_sums[who][t].append([float(errors[who, t][i][c[r]].sum()) for r in names])
    mean = {who: {t: {r: sums[who][t][r] / counts[t][r] if counts[t][r] else float("nan") for r in names}
                  for t in timesteps} for who in sums}
    delta = {e: {t: {r: mean[e][t][r] - mean["base"][t][r] for r in names} for t in timesteps} for e in moles}
    for e in moles:
        delta[e]["mean"] = {r: float(_nanmean(np.asarray([delta[e][t][r] for t in timesteps]))) for r in names}
    return {"regions": names, "timesteps": list(timesteps), "pictures": len(pictures), "strength": strength,
            "cells": {r: counts[timesteps[0]][r] for r in names},
            "base": {str(t): mean["base"][t] for t in timesteps},
            "delta": {e: {str(t): v for t, v in d.items()} for e, d in delta.items()},
            "per_picture": {"counts": picture_counts,
                            "sums": {who: {str(t): v for t, v in by_t.items()} for who, by_t in picture_sums.items()}}}


def _bootstrap_deltas(result: dict, expert: str, resamples: int = 2000, seed: int = 0) -> np.ndarray | None:
    """(resamples, regions): the expert's delta per region on the mean over timesteps, for pictures drawn with
    replacement; None for a result without per-picture sums (written before they were kept)."""
    per = result.get("per_picture")
    if not per or not per["counts"]:
        return None
    counts = np.asarray(per["counts"], dtype=np.float64)                     # (pictures, regions)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(counts), size=(resamples, len(counts)))
    n = counts[idx].sum(axis=1)                                               # (resamples, regions)
    with np.errstate(invalid="ignore", divide="ignore"):
        deltas = [np.asarray(per["sums"][expert][t])[idx].sum(axis=1) / n -
                  np.asarray(per["sums"]["base"][t])[idx].sum(axis=1) / n for t in per["sums"]["base"]]
        return _nanmean(np.stack(deltas), axis=0) if len(deltas) > 1 else deltas[0]


def _nanmean(values: np.ndarray, axis: int | None = None):
    """np.nanmean without its warning where every value is NaN (a region without cells, e.g. the background of a
    whole-picture close-up): NaN there."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _effect(delta: float, ci: list[float] | None) -> str:
    """"hurts" (interval above 0), "helps" (below 0) or "none" (spans 0); without an interval, by the delta."""
    low, high = ci if ci else (delta, delta)
    return "hurts" if low > 0 else "helps" if high < 0 else "none"


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def margin_interval(result: dict, expert: str, own: str, resamples: int = 2000, seed: int = 0) -> list[float] | None:
    """95% bootstrap interval over pictures of an expert's margin on the mean over timesteps (the smallest other
    region's delta minus its own region's; positive = it helps its own region most). None for a result without
    per-picture sums (written before they were kept)."""
    delta = _bootstrap_deltas(result, expert, resamples, seed)
    if delta is None:
        return None
    o = result["regions"].index(own)
    others = np.delete(delta, o, axis=1) - delta[:, [o]]
    with np.errstate(invalid="ignore"):
        margins = np.nanmin(np.where(np.isnan(others), np.inf, others), axis=1)
    return _interval(margins)


def cross_effects(result: dict, resamples: int = 2000, seed: int = 0) -> dict[str, dict]:
    """What each expert named like a region does to the other parts' cells (named regions, not the background),
    on the mean over timesteps: {expert: {"own": region, "parts": {region: {"delta", "ci95", "share", "effect"}},
    "reason_to_close": bool}}. share: the other part's change over the own part's (0.5 = it helps the other part half
    as much as its own); effect: "hurts" (interval above 0), "helps" (below 0) or "none" (spans 0; no interval:
    judged on the delta alone). A gate has a reason to close an expert on a part only where the expert hurts it;
    reason_to_close: it hurts every other part."""
    out = {}
    regions = [r for r in result["regions"] if r != BACKGROUND]
    for expert, by_t in result["delta"].items():
        if expert not in regions:
            continue
        mean, boot = by_t["mean"], _bootstrap_deltas(result, expert, resamples, seed)
        parts = {}
        for r in regions:
            if r == expert or np.isnan(mean[r]):
                continue
            ci = None if boot is None else _interval(boot[:, result["regions"].index(r)])
            parts[r] = {"delta": float(mean[r]), "ci95": ci,
                        "share": float(mean[r] / mean[expert]) if mean[expert] < 0 else None,
                        "effect": _effect(mean[r], ci)}
        out[expert] = {"own": expert, "parts": parts,
                       "reason_to_close": bool(parts) and all(v["effect"] == "hurts" for v in parts.values())}
    return out


def cross_effect_lines(result: dict) -> list[str]:
    """One line per expert and other part: what the expert does there and whether a gate has a reason to close it."""
    lines = []
    for expert, c in cross_effects(result).items():
        for part, v in c["parts"].items():
            ci = f" [{v['ci95'][0]:+.5f}, {v['ci95'][1]:+.5f}]" if v["ci95"] else ""
            share = f", {v['share']:.0%} of its change on {expert}" if v["share"] is not None else ""
            why = {"hurts": "a gate has a reason to close it there",
                   "helps": "nothing pushes a gate to close it there (opening it helps too)",
                   "none": "within the noise: a gate gains nothing by opening or closing it there"}[v["effect"]]
            what = f"no clear effect on {part}" if v["effect"] == "none" else f"it {v['effect']} {part}"
            lines.append(f"- {expert} expert on {part}: {v['delta']:+.5f}{ci}{share}: {what}; {why}")
    return lines


def verdicts(result: dict) -> dict[str, dict]:
    """Per expert: its own region (the region of its name, if any) and, per timestep and on the mean, whether it
    lowers the error there more than on every other region (background included)."""
    out = {}
    for expert, by_t in result["delta"].items():
        own = expert if expert in result["regions"] and expert != BACKGROUND else None
        holds = {}
        if own is not None:
            for t, d in by_t.items():
                others = [v for r, v in d.items() if r != own and not np.isnan(v)]
                holds[t] = bool(not np.isnan(d[own]) and all(d[own] < v for v in others))
        out[expert] = {"own": own, "holds": holds, "passes": bool(holds) and holds.get("mean", False)}
        if own is not None:
            mean = by_t["mean"]
            others = [v - mean[own] for r, v in mean.items() if r != own and not np.isnan(v)]
            out[expert]["margin"] = float(min(others)) if others else float("nan")
            out[expert]["margin_ci95"] = margin_interval(result, expert, own)
    return out


def table(result: dict) -> list[str]:
    """The deltas as markdown: one row per expert and timestep, one column per region."""
    names = result["regions"]
    lines = ["| expert | timestep | " + " | ".join(f"{r} ({result['cells'][r]} cells)" for r in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for expert, by_t in result["delta"].items():
        for t, d in by_t.items():
            lines.append(f"| {expert} | {t} | " + " | ".join(f"{d[r]:+.5f}" for r in names) + " |")
    lines += ["", "| base error | timestep | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for t, d in result["base"].items():
        lines.append(f"| base | {t} | " + " | ".join(f"{d[r]:.5f}" for r in names) + " |")
    return lines


def verdict_lines(result: dict) -> list[str]:
    lines = []
    for expert, v in verdicts(result).items():
        if v["own"] is None:
            lines.append(f"- {expert}: no region is named {expert!r}; no verdict")
            continue
        at = ", ".join(f"{t} {'yes' if ok else 'no'}" for t, ok in v["holds"].items())
        ci = v.get("margin_ci95")
        margin = f"margin {v['margin']:+.5f}" + (f" [{ci[0]:+.5f}, {ci[1]:+.5f}]" if ci else "")
        noise = "; the interval spans 0: within the noise of these pictures" if ci and ci[0] < 0 < ci[1] else ""
        lines.append(f"- {expert}: {'PASSES' if v['passes'] else 'FAILS'}: it "
                     f"{'lowers' if v['passes'] else 'does not lower'} the error on {v['own']} more than on every "
                     f"other region, on the mean over timesteps (per timestep: {at}); {margin} (the smallest other "
                     f"region's change minus its own, 95% bootstrap interval over pictures){noise}")
    return lines


WHOLE = "picture"      # the one region of a close-up measured as a whole picture


def whole_pictures(pictures: list[Picture]) -> list[Picture]:
    """The pictures with one region, WHOLE, covering every pixel (close-ups: a sample-level, global gate sees the
    whole picture)."""
    from PIL import Image

    def shape(p: Picture) -> tuple[int, int]:
        if p.masks:
            return next(iter(p.masks.values())).shape
        with Image.open(p.image) as im:
            return im.height, im.width
    return [Picture(p.image, p.caption, {WHOLE: np.ones(shape(p), bool)}) for p in pictures]


def read_closeups(item: str, caption_extension: str = ".caption") -> tuple[str, list[Picture]]:
    """--closeups KIND=FOLDER: (kind, the folder's images with caption files as whole pictures)."""
    kind, sep, folder = item.partition("=")
    if not sep or not kind or not Path(folder).is_dir():
        raise ConfigError(f"--closeups {item!r}: give kind=folder, e.g. face=closeups/faces (an existing folder of "
                          "images with caption files)")
    pictures = [Picture(p, p.with_suffix(caption_extension).read_text().strip(), {})
                for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.with_suffix(caption_extension).exists()]
    if not pictures:
        raise ConfigError(f"--closeups {item!r}: no image with a caption file ({caption_extension}) in {folder}")
    return kind, whole_pictures(pictures)


def closeup_effects(results: dict[str, dict], resamples: int = 2000, seed: int = 0) -> dict[str, dict]:
    """{expert: {kind: {"delta", "ci95", "effect"}}} from measure() results on close-ups of each kind (a part name)
    taken as whole pictures (whole_pictures): each expert's change on each kind of close-up, mean over timesteps,
    with its 95% bootstrap interval over pictures; effect as in cross_effects."""
    out: dict[str, dict] = {}
    for kind, result in results.items():
        for expert, by_t in result["delta"].items():
            boot = _bootstrap_deltas(result, expert, resamples, seed)
            delta = by_t["mean"][WHOLE]
            ci = None if boot is None else _interval(boot[:, result["regions"].index(WHOLE)])
            out.setdefault(expert, {})[kind] = {"delta": float(delta), "ci95": ci, "effect": _effect(delta, ci)}
    return out


def closeup_lines(results: dict[str, dict]) -> list[str]:
    """One line per expert and kind of close-up; on the other part's close-ups, whether a global gate (one value
    per picture) has a reason to close the expert there."""
    lines = []
    for expert, by_kind in closeup_effects(results).items():
        for kind, v in by_kind.items():
            ci = f" [{v['ci95'][0]:+.5f}, {v['ci95'][1]:+.5f}]" if v["ci95"] else ""
            what = "no clear effect on them" if v["effect"] == "none" else f"it {v['effect']} them"
            if kind == expert:
                why = "its own kind"
            else:
                why = {"hurts": "a global gate has a reason to close it on them",
                       "helps": "nothing pushes a global gate to close it on them",
                       "none": "a global gate gains nothing by opening or closing it on them"}[v["effect"]]
            lines.append(f"- {expert} expert on {kind} close-ups (whole pictures): {v['delta']:+.5f}{ci}: {what}; "
                         f"{why}")
    return lines


def write(result: dict, folder: Path, closeups: dict[str, dict] | None = None) -> Path:
    """expert_effect.json, .md and .png in `folder` (with `closeups`, measure() results per kind of close-up as
    whole pictures, also expert_effect_closeups.json and their lines in the markdown); returns the markdown
    file."""
    from ...mole_ops.plots import grouped_bars, save_png

    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "expert_effect.json", json.dumps({**result, "verdicts": verdicts(result),
                                                          "cross_effects": cross_effects(result)}, indent=1))
    md = folder / "expert_effect.md"
    write_text(md, "\n".join([
        "# Does each expert help its own part more than the others?", "",
        f"Change in eps-prediction error per latent cell made by each expert alone (strength {result['strength']:g})"
        f" against the base, on {result['pictures']} held-out pictures, fixed noise; negative = lower error.", "",
        *table(result), "", *verdict_lines(result), "", "## Cross-effect: what each expert does to the other parts",
        "", *cross_effect_lines(result),
        *(["", "On close-ups as whole pictures (what a global gate sees):", "", *closeup_lines(closeups)]
          if closeups else [])]) + "\n")
    if closeups:
        write_text(folder / "expert_effect_closeups.json", json.dumps(closeups))
    groups = {e: d["mean"] for e, d in result["delta"].items()}
    save_png(grouped_bars(groups, title="change in denoising error per region (mean over timesteps)",
                          ylabel="expert - base (lower is better)"), str(folder / "expert_effect.png"))
    return md


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="the base the experts were trained on")
    parser.add_argument("--experts", nargs="+", required=True, help="role=path, e.g. face=face.safetensors")
    parser.add_argument("--images", type=Path, required=True, help="held-out images with caption files")
    parser.add_argument("--masks", type=Path, help="region masks <stem>_<region>.png (default: <images>/masks)")
    parser.add_argument("--caption_extension", default=".caption")
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(TIMESTEPS))
    parser.add_argument("--resolution", type=int, help="image size (default: each image's own)")
    parser.add_argument("--strength", type=float, default=1.0, help="multiplier of each expert's own scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed noise")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--closeups", nargs="+", default=[], metavar="KIND=FOLDER",
                        help="close-ups of each part (images with caption files, no masks), measured as whole "
                             "pictures: what a global gate sees, e.g. face=closeups/faces hand=closeups/hands")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ...mole_ops import expert_file
    from ..harness.host import use_comfy
    from .config import check_role_name
    from .model import Base

    experts = []
    for item in args.experts:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).exists():
            raise ConfigError(f"--experts {item!r}: give role=path to an existing file")
        experts.append(expert_file.load(path, check_role_name(name, "--experts")))
    if any(not 0 <= t < 1000 for t in args.timesteps):
        raise ConfigError("--timesteps must lie in 0..999")
    pictures = read_pictures(args.images, args.masks or args.images / "masks", args.caption_extension)
    kinds = dict(read_closeups(item, args.caption_extension) for item in args.closeups)
    use_comfy()
    base = Base(args.pretrained_model_name_or_path)
    size = (args.resolution, args.resolution) if args.resolution else None
    try:
        result = measure(base, experts, pictures, tuple(args.timesteps), args.seed, args.batch, size, args.strength)
        closeups = {kind: measure(base, experts, pics, tuple(args.timesteps), args.seed, args.batch, size,
                                  args.strength) for kind, pics in kinds.items()}
    except RuntimeError as e:
        raise MoLEError(f"expert-effect: {e}") from e
    path = write(result, args.output_dir, closeups)
    print("\n".join(table(result) + [""] + verdict_lines(result) + [""] + cross_effect_lines(result)
                    + ([""] + closeup_lines(closeups) if closeups else []) + ["", f"written: {path}"]))
    return 0
