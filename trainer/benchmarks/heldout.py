"""The in-world scorer of `python -m trainer evaluate --heldout IMAGES --masks MASKS`: instead of generating and
scoring pictures, each model's held-out denoising loss on pictures whose parts are known (the demo world's held-out
scenes, or real images with detector masks), overall and per region, at fixed noise and timesteps
(training/evaluation.py: the same draws for every model, so differences are paired per picture).

Rows are (model, repeat = index of the noise seed, prompt_id = picture index, seed, prompt = caption, image) with
the columns `loss` (all latent cells), `loss_<region>` (cells at least half covered by the region) and
`loss_background` (cells no region touches); lower is better. The models come from the same models TOML; they run
in this process, on the trainer's base (training/model.py) with MoLE attached by mole_ops' hooks, as the
trainer's own held-out loss does.
"""
from __future__ import annotations

from ..training.evaluation import held_out_cell_errors
from ..training.expert_effect import BACKGROUND, read_pictures, region_cells
from .models import ModelSpec


def load_mole(spec: ModelSpec, layout):
    """(MoLE or None, GateSettings) of a model spec: its experts and gates as the nodes would attach them."""
    from ...mole_ops import expert_file, gate_file, pack_file
    from ...mole_ops.mixture import build
    from ...mole_ops.ops import GateSettings
    from ...mole_ops.rank import RankRule, reduce

    if spec.experts:
        experts = [expert_file.load(p, r) for p, r in zip(spec.experts, spec.roles)]
        gates = gate_file.load(spec.gates) if spec.gates else None
    elif spec.pack:
        experts, gates = pack_file.load(spec.pack)
    elif spec.set:
        experts = [expert_file.load(spec.set[0], "face"), expert_file.load(spec.set[1], "hand")]
        gates = gate_file.load(spec.set[2])
    else:
        return None, GateSettings("none")
    rule = RankRule.parse(spec.rank)
    experts = [reduce(e, rule) for e in experts]        # the loaders' rank setting (full: unchanged)
    mole = build(experts, gates, layout)
    strengths = dict(zip(mole.order, spec.strengths))
    return mole, GateSettings(spec.mode, {n: strengths.get(n, 1.0) for n in mole.order})


def columns(pictures) -> list[str]:
    regions = sorted({r for p in pictures for r in p.masks})
    return ["loss", *[f"loss_{r}" for r in regions], f"loss_{BACKGROUND}"]


def score_model(spec: ModelSpec, pictures, seeds: list[int], base_cache: dict) -> list[dict]:
    """One model's rows: every picture under every noise seed."""
    from ...mole_ops.hooks import HookState, attached
    from ..training.model import Base

    if spec.checkpoint not in base_cache:
        base_cache.clear()                      # one base in memory at a time, with its pictures' encodings
        base_cache[spec.checkpoint] = Base(spec.checkpoint), {}
    base, encoded = base_cache[spec.checkpoint]
    regions = sorted({r for p in pictures for r in p.masks})
    mole, settings = load_mole(spec, base.layout)
    rows = []
    for repeat, seed in enumerate(seeds):
        with attached(base.model, mole, HookState(settings)):
            maps = held_out_cell_errors(base, [(p.image, p.caption) for p in pictures], seed, encoded=encoded)
        for i, (p, m) in enumerate(zip(pictures, maps)):
            rows.append({"model": spec.name, "repeat": repeat, "prompt_id": i, "seed": seed, "prompt": p.caption,
                         "image": str(p.image), **region_losses(m, p, regions)})
    return rows


def region_losses(errors, picture, regions: list[str]) -> dict[str, str]:
    """{column: value} of one picture's (h, w) error map: the mean over all cells and over each region's cells
    (empty where the picture has no cell of that region)."""
    out = {"loss": repr(float(errors.mean()))}
    for r, c in region_cells(picture, regions, tuple(errors.shape)).items():
        out[f"loss_{r}"] = repr(float(errors[c].mean())) if bool(c.any()) else ""
    return out


__all__ = ["load_mole", "columns", "score_model", "region_losses", "read_pictures", "BACKGROUND"]
