"""The main job: the whole MoLE pipeline on this machine, in a synthetic human-centric world.

1. the world (scenes with a face and a raised hand, face and hand close-ups, held-out sets with masks);
2. a tiny base checkpoint the stock loader detects (random UNet and text encoder, the world's VAE: a
   TAESD trained once on the world and shipped, vae.py);
3. stage 1 (the UNet fine-tuned on plain scenes), stage 2 (a face and a hand expert on detailed scenes and
   close-ups, the loss masked to their part), stage 3 (gates on the scenes), through the trainer;
4. a real ComfyUI server running the shipped workflows on the trained files (MoLE txt2img with gate maps and
   curves, the ablation grid);
5. the evidence on held-out pictures (gate AUCs, global gates on close-ups), the in-world evaluation (`evaluate
   --heldout`: held-out denoising loss per region of every model of the paper's Tables 2-3) and a report.

Every artefact is cached in --output_dir: a second run skips what exists (delete a file to redo that part).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..harness.host import REPO_ROOT, use_comfy
from ..harness.workflows import SD15, load_api

log = logging.getLogger("mole.demo")


@dataclass(frozen=True)
class Recipe:
    """Sizes and step counts of one demo run."""

    scenes: int = 256
    closeups: int = 128
    heldout: int = 48
    stage1_steps: int = 400
    expert_steps: int = 200
    gate_steps: int = 300
    rank: int = 16
    sample_steps: int = 20


FULL = Recipe()
QUICK = Recipe(scenes=24, closeups=16, heldout=8, stage1_steps=4, expert_steps=3, gate_steps=3,
               rank=4, sample_steps=3)
WORKFLOWS = {"mole_sd15_txt2img": "MoLE txt2img with gate maps and curves",
             "mole_sd15_ablation": "ablation grid: base, face only, hand only, local, global, both"}
TINY_BASE = "mole_tiny_base.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", type=Path, default=REPO_ROOT / "demo_output",
                        help="where the demo writes the world, models, server folder and results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny step counts (a smoke run of the pipeline)")
    parser.set_defaults(run=run)


def _train(stage: str, out: Path, name: str, base: Path, **options) -> Path:
    """Run one trainer stage unless its file exists; returns the file. Latents are kept on disk in the stage's
    train/ folder, so the experts and the gates (one folder) encode each picture once."""
    import comfy.model_management

    from ..training.config import TrainConfig, validate
    from ..training.loop import Run

    target = out / f"{name}.safetensors"
    if target.exists():
        log.info("reusing %s", target)
        return target
    config = TrainConfig(stage=stage, pretrained_model_name_or_path=str(base), output_dir=str(out / "train"),
                         output_name=name, cache_latents_to_disk=True, resolution="64", **options)
    validate(config)
    run_ = Run(config)
    produced = run_.train()
    run_.stage.detach()
    del run_
    comfy.model_management.unload_all_models()
    gc.collect()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(produced, target)
    return target


def build_stage1(out: Path, recipe: Recipe, seed: int, world: dict) -> tuple[Path, Path]:
    """The tiny base (random UNet and text encoder, the world's shipped VAE) and stage 1: (tiny, stage1)."""
    from ..harness.tiny_models import write_detectable_checkpoint
    from . import vae

    ckpts = out / "models" / "checkpoints"
    tiny = ckpts / TINY_BASE
    if not tiny.exists():
        write_detectable_checkpoint(tiny, seed=seed, vae=vae.load())
    # stage 1 learns plain people (bare faces, mittens); the experts bring the detail
    stage1 = _train("finetune", ckpts, SD15["checkpoint"].removesuffix(".safetensors"), tiny,
                    dataset_config=str(world["plain_toml"]), max_train_steps=recipe.stage1_steps, learning_rate=2e-4,
                    seed=seed, lr_scheduler="cosine", lr_warmup_steps=min(20, recipe.stage1_steps - 1))
    return tiny, stage1


def build_models(out: Path, recipe: Recipe, seed: int, world: dict) -> dict[str, Path]:
    tiny, stage1 = build_stage1(out, recipe, seed, world)
    mole = out / "models" / "mole"
    # each expert learns from detailed scenes and close-ups with its loss masked to its own part
    experts = {}
    for role in ("face", "hand"):
        experts[role] = _train("expert", mole, SD15[role].removesuffix(".safetensors"), stage1,
                               dataset_config=str(world[f"{role}_expert_toml"]), expert_name=role, masked_loss=True,
                               network_dim=recipe.rank, network_alpha=float(recipe.rank),
                               max_train_steps=recipe.expert_steps, learning_rate=1e-3, seed=seed + 1,
                               optimizer_args=["weight_decay=0.01"])
    precondition(out / "results", stage1, experts, world, seed)
    gates = _train("gates", mole, SD15["gates"].removesuffix(".safetensors"), stage1,
                   dataset_config=str(world["scenes_toml"]), experts=[f"{r}={p}" for r, p in experts.items()],
                   max_train_steps=recipe.gate_steps, learning_rate=1e-3, seed=seed + 2)
    return {"tiny": tiny, "stage1": stage1, **experts, "gates": gates}


def precondition(results: Path, stage1: Path, experts: dict[str, Path], world: dict, seed: int) -> Path:
    """Before the gates train: does each expert help its own part more than the others (expert-effect on the
    held-out scenes and their masks)? Measured once, kept in results/expert_effect.* (delete them to measure
    again)."""
    import comfy.model_management

    from ...mole_ops import expert_file
    from ..training import expert_effect
    from ..training.model import Base
    from .world import load_masks

    if (results / "expert_effect.json").exists():
        return results / "expert_effect.md"
    base = Base(stage1)
    pictures = [expert_effect.Picture(i, c, m) for i, c, m in load_masks(world["heldout_scenes"])]
    loaded = [expert_file.load(path, role) for role, path in experts.items()]
    with torch.random.fork_rng():          # the experts' fresh (unused) gates draw from torch's generator
        result = expert_effect.measure(base, loaded, pictures, seed=seed)
    del base
    comfy.model_management.unload_all_models()
    path = expert_effect.write(result, results)
    log.info("expert-effect before the gates:\n%s", "\n".join(expert_effect.verdict_lines(result)))
    return path


# The models of the in-world evaluation (the paper's Tables 2-3): label -> (model keys, experts' mode, strength)
EVALUATED = (("tiny base", "tiny", None, None), ("+ stage 1", "stage1", None, None),
             ("+ experts, fixed scale 0.25", "stage1", "none", 0.25),
             ("+ experts, fixed scale 0.5", "stage1", "none", 0.5),
             ("+ experts, fixed scale 1 (no gates)", "stage1", "none", 1.0),
             ("+ untrained gates (both)", "stage1", "untrained", None),
             ("+ gates, local only", "stage1", "local", None), ("+ gates, global only", "stage1", "global", None),
             ("+ gates, both (MoLE)", "stage1", "both", None))
REFERENCE = "+ stage 1"


def untrained_gates(path: Path, models: dict[str, Path], seed: int) -> Path:
    """The control: gates of the demo's experts with PyTorch's default init (seeded), as a gate file."""
    from ...mole_ops import expert_file, gate_file
    from ...mole_ops.mixture import build
    from ..training.model import Base

    if not path.exists():
        experts = [expert_file.load(models[r], r) for r in ("face", "hand")]
        layout = Base(models["stage1"]).layout
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            gate_file.save(path, build(experts, None, layout).export_gates(experts))
    return path


def in_world_evaluation(results: Path, models: dict[str, Path], world: dict, seed: int) -> dict:
    """`python -m trainer evaluate --heldout` on the held-out scenes: every model of EVALUATED against stage 1, with
    the demo's seed as the noise seed. Its files go to results/evaluation (models.toml: the command to repeat it)."""
    from ..benchmarks import models as model_list
    from ..benchmarks.evaluate import heldout_evaluation

    folder = results / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    untrained = untrained_gates(folder / "untrained_gates.safetensors", models, seed)
    experts = json.dumps([str(models["face"]), str(models["hand"])])
    lines = [f"reference = {json.dumps(REFERENCE)}"]
    for label, checkpoint, mode, strength in EVALUATED:
        lines += ["", "[[model]]", f"name = {json.dumps(label)}", f"checkpoint = {json.dumps(str(models[checkpoint]))}"]
        if mode is not None:
            gates = untrained if mode == "untrained" else models["gates"]
            lines += [f"experts = {experts}", f"mode = {json.dumps('both' if mode == 'untrained' else mode)}"]
            lines += [f"strengths = [{strength}, {strength}]"] if mode == "none" else \
                [f"gates = {json.dumps(str(gates))}"]
    (folder / "models.toml").write_text("\n".join(lines) + "\n")
    scenes = world["heldout_scenes"]
    return heldout_evaluation(model_list.load(folder / "models.toml"), scenes, scenes / "masks", [seed], folder,
                              "cpu", "held-out scenes of the demo world")


def comfy_base(out: Path, models: dict[str, Path]) -> Path:
    """The demo's ComfyUI base directory: the stage-1 checkpoint, the experts and the gates under the names the
    shipped workflows expect."""
    from ..harness.comfy_server import prepare_base_dir

    return prepare_base_dir(out / "comfy", {"checkpoints": [models["stage1"]],
                                            "mole": [models["face"], models["hand"], models["gates"]]})


def run_workflows(out: Path, models: dict[str, Path], recipe: Recipe, results: Path) -> list[Path]:
    from ..harness.comfy_server import ComfyServer

    base = comfy_base(out, models)
    shutil.rmtree(base / "output", ignore_errors=True)   # file counters restart: a re-run replaces its pictures
    written = []
    log.info("starting ComfyUI (log: %s)", base / "server.log")
    with ComfyServer(base) as server:
        for name, what in WORKFLOWS.items():
            t = time.monotonic()
            outputs = server.run(load_api(name, 64, 64, recipe.sample_steps))
            for path in server.output_files(outputs):
                shutil.copy2(path, results / path.name)
                written.append(results / path.name)
            log.info("%s (%s): %.1f s", name, what, time.monotonic() - t)
    return written


def prepare(out: Path, recipe: Recipe, seed: int) -> tuple[dict, dict[str, Path]]:
    """The world and every trained file of the demo in `out`, built where missing: (world, models)."""
    from .world import write_world

    out.mkdir(parents=True, exist_ok=True)
    settings = out / "recipe.json"
    if settings.exists() and json.loads(settings.read_text()) != {**asdict(recipe), "seed": seed}:
        raise SystemExit(f"{out} holds a demo of other settings ({settings}); use another --output_dir")
    settings.write_text(json.dumps({**asdict(recipe), "seed": seed}))
    use_comfy()
    world = write_world(out / "world", seed, 64, recipe.scenes, recipe.closeups, recipe.heldout)
    return world, build_models(out, recipe, seed, world)


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    recipe = QUICK if args.quick else FULL
    out = Path(args.output_dir).resolve()
    world, models = prepare(out, recipe, args.seed)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    for curve in (out / "models").rglob("train/*_loss.png"):
        shutil.copy2(curve, results / curve.name)
    images = run_workflows(out, models, recipe, results)
    evaluation = in_world_evaluation(results, models, world, args.seed)
    from . import report

    path = report.write(results, models, world, images, evaluation, args.seed, time.monotonic() - start)
    log.info("demo finished in %.1f s; report: %s", time.monotonic() - start, path)
    return 0
