"""From `make demo` to the real UI in one command: ComfyUI with this pack on the demo's trained files.

    python -m trainer serve            (or: make serve)

Builds the demo's files first where they are missing (the world, the world base, stage 1, the face and hand
experts and the gates: about 8 minutes on 2 cores the first time, seconds after that), lays out a ComfyUI base
directory on them (the files under the names the shipped workflows expect), puts demo-sized copies of the shipped
SD1.5 workflows into its saved workflows (the Workflows sidebar: 64 px, 10 steps at CFG 3, seconds on a CPU; the
templates stay at 512 px / 50 steps for real SD1.5 files), starts ComfyUI on a loopback port and prints its address.
Ctrl-C stops it.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from pathlib import Path

from ..harness.host import REPO_ROOT
from ..harness.workflows import TEMPLATE_PATH, WORKFLOWS, resize_ui

log = logging.getLogger("mole.demo")
DEMO_SIZE = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", type=Path, default=REPO_ROOT / "demo_output",
                        help="the demo's folder (built there first if its files are missing)")
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (as for `demo`)")
    parser.add_argument("--quick", action="store_true", help="the demo's smoke-run sizes (as for `demo --quick`)")
    parser.add_argument("--port", type=int, default=8188, help="loopback port of the server")
    parser.set_defaults(run=run)


def demo_workflows(base: Path, steps: int, cfg: float) -> list[Path]:
    """Demo-sized copies of the shipped SD1.5 workflows in the base directory's saved workflows."""
    from .pipeline import DEMO_TEXTS

    folder = base / "user" / "default" / "workflows"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, workflow in WORKFLOWS.items():
        if "sd15" not in name:
            continue
        ui = resize_ui(json.loads(workflow.ui_path.read_text()), DEMO_SIZE, DEMO_SIZE, steps, cfg=cfg, **DEMO_TEXTS)
        path = folder / f"{workflow.title.replace('MoLE SD1.5', 'MoLE demo')}.json"
        path.write_text(json.dumps(ui, indent=1))
        written.append(path)
    return written


class _Stop:
    """Ctrl-C (SIGINT) or SIGTERM asks the server loop to stop. The handler only sets a flag: an exception raised
    inside Popen.poll() can leave its lock held, and the stop's wait() then blocks forever. A second Ctrl-C
    interrupts the stop itself."""

    def __init__(self):
        self.asked = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)

    def __call__(self, *_):
        self.asked = True
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run(args: argparse.Namespace) -> int:
    from ..harness.comfy_server import ComfyServer
    from .pipeline import FULL, QUICK, comfy_base, prepare

    recipe = QUICK if args.quick else FULL
    out = Path(args.output_dir).resolve()
    _, models = prepare(out, recipe, args.seed)
    base = comfy_base(out, models)
    saved = demo_workflows(base, recipe.sample_steps, recipe.cfg)
    server = ComfyServer(base, port=args.port)
    log.info("starting ComfyUI on the demo's files (log: %s)", server.log_path)
    stop = _Stop()
    try:
        server.start()
        print(f"ComfyUI with the MoLE demo: {server.url}  (Ctrl-C stops it)\n"
              f"  open the Workflows sidebar for the demo-sized workflows: {', '.join(p.stem for p in saved)}\n"
              f"  the templates ({TEMPLATE_PATH}) are sized for real SD1.5 files",
              flush=True)
        while not stop.asked and server.proc.poll() is None:
            time.sleep(0.5)
        if stop.asked:
            log.info("stopping ComfyUI")
            return 0
        log.error("ComfyUI exited with code %s; its log: %s", server.proc.returncode, server.log_path)
        return 1
    finally:
        server.stop()
