"""The main job: start a real ComfyUI with this package and run the shipped MoLE workflows through its API.

Until the synthetic world and the trainer land (issues 5-7), the models are stand-ins: the small detectable SD1.5
checkpoint and untrained face/hand experts and gates with random weights, written under the file names the
workflows expect. The pictures therefore show noise and random gate maps; they show that the pipeline (loaders,
Apply MoLE, sampler, gate maps and curves, ablation grid) runs end to end.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from .host import REPO_ROOT, use_comfy
from .workflows import SD15, load_api

log = logging.getLogger("mole.demo")

RUNS = {"mole_sd15_txt2img": "MoLE txt2img with gate maps and curves",
        "mole_sd15_ablation": "ablation grid: base, face only, hand only, local, global, both"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", type=Path, default=REPO_ROOT / "demo_output",
                        help="where the demo writes its models, server folder and results")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stand-in models")
    parser.add_argument("--size", type=int, default=192, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=12, help="sampling steps")
    parser.set_defaults(run=run)


def prepare_models(models: Path, seed: int) -> dict[str, list[Path]]:
    """The stand-in models under the workflows' file names (written once, reused on later runs)."""
    checkpoint = models / "checkpoints" / SD15["checkpoint"]
    mole = {role: models / "mole" / SD15[role] for role in ("face", "hand", "gates")}
    if not checkpoint.exists() or not all(p.exists() for p in mole.values()):
        use_comfy()
        from .tiny_models import write_detectable_checkpoint, write_stand_in_files

        log.info("writing the stand-in models to %s", models)
        write_detectable_checkpoint(checkpoint, seed=seed)
        mole["face"].parent.mkdir(parents=True, exist_ok=True)
        write_stand_in_files("SD15", mole, seed=seed)
    return {"checkpoints": [checkpoint], "mole": list(mole.values())}


def run(args: argparse.Namespace) -> int:
    from .comfy_server import ComfyServer, prepare_base_dir

    start = time.monotonic()
    out = Path(args.output_dir).resolve()
    base = prepare_base_dir(out / "comfy", prepare_models(out / "models", args.seed))
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    log.info("starting ComfyUI (log: %s)", base / "server.log")
    written = []
    with ComfyServer(base) as server:
        for name, what in RUNS.items():
            t = time.monotonic()
            outputs = server.run(load_api(name, args.size, args.size, args.steps))
            for path in server.output_files(outputs):
                shutil.copy2(path, results / path.name)
                written.append(results / path.name)
            log.info("%s (%s): %.1f s", name, what, time.monotonic() - t)
    log.info("demo finished in %.1f s; %d images in %s:\n  %s", time.monotonic() - start, len(written), results,
             "\n  ".join(p.name for p in written))
    return 0
