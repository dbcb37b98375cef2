"""The main job: start a real ComfyUI with this package and generate an image through its API.

Until the synthetic-world demo lands, this runs a txt2img graph on the small detectable checkpoint (random
weights, so the picture is noise): it shows the host, the package registration and the server round trip work.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from .host import REPO_ROOT, use_comfy

log = logging.getLogger("mole.demo")

CHECKPOINT = "mole-detectable-sd15.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", type=Path, default=REPO_ROOT / "demo_output",
                        help="where the demo writes its models, server folder and results")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .comfy_server import ComfyServer, prepare_base_dir
    from .graphs import txt2img

    start = time.monotonic()
    out = Path(args.output_dir).resolve()
    ckpt = out / "models" / "checkpoints" / CHECKPOINT
    if not ckpt.exists():
        use_comfy()
        from .tiny_models import write_detectable_checkpoint

        log.info("building the detectable SD1.5 checkpoint at %s", ckpt)
        write_detectable_checkpoint(ckpt, seed=args.seed)
    base = prepare_base_dir(out / "comfy", {"checkpoints": [ckpt]})
    log.info("starting ComfyUI (log: %s)", base / "server.log")
    with ComfyServer(base) as server:
        graph = txt2img(CHECKPOINT, "a portrait of a smiling person waving", seed=args.seed, width=64, height=64,
                        prefix="mole_demo")
        outputs = server.run(graph)
        images = server.output_files(outputs)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    for image in images:
        shutil.copy2(image, results / image.name)
    log.info("demo finished in %.1f s; images in %s: %s", time.monotonic() - start, results,
             ", ".join(i.name for i in images))
    return 0
