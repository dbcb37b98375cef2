"""Benchmark: trainer throughput and peak memory on the detectable SD1.5 checkpoint (CPU).

Modes, each in its own process (so peak RSS is its own), same batches:
  base     a plain forward + backward of the base UNet (gradient to the input; nothing trains)
  expert   one stage-2 step: a rank-R LoRA on all target layers, AdamW
  gates    one stage-3 step: two frozen rank-R experts, gates train, AdamW
  gates+compile  the same with --torch_compile (inductor), timed against two base steps in the same process: through
           the same compiled UNet (MoLE's hooks off) and plain; the compile itself (its first steps) is printed apart
           and left out of the step times
Prints samples/s, seconds per step, peak RSS, RSS growth while stepping, and the ratio of a stage-3 (and stage-2) step
to a base step timed next to it in the same process (interleaved).

    .venv/bin/python tests/bench_trainer.py [--size 64] [--batch 4] [--rank 16] [--steps 10]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
spec = importlib.util.spec_from_file_location("comfyui_mole", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
sys.modules["comfyui_mole"] = pkg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pkg)


MODES = ("base", "expert", "gates", "gates+compile")


def make_inputs(folder: Path, size: int, n: int = 16) -> Path:
    from PIL import Image, ImageDraw

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (30 * (i % 8), 90, 200))
        ImageDraw.Draw(im).ellipse((size // 4, size // 4, size // 2 + i, size // 2 + i), fill=(230, 200, 40))
        im.save(images / f"{i:02d}.png")
        (images / f"{i:02d}.caption").write_text(f"a yellow circle number {i}")
    return images


def one_mode(args) -> dict:
    import torch

    from comfyui_mole.trainer.training.config import TrainConfig, validate
    from comfyui_mole.trainer.training.loop import Run

    work = Path(args.work)
    common = dict(pretrained_model_name_or_path=str(work / "base.safetensors"), train_data_dir=str(work / "images"),
                  resolution=str(args.size), output_dir=str(work / args.mode), train_batch_size=args.batch,
                  cache_latents=True, max_train_steps=10**6, learning_rate=1e-4)
    if args.mode.startswith("gates"):
        c = TrainConfig(stage="gates", output_name="g", experts=[f"face={work / 'face.safetensors'}",
                                                                 f"hand={work / 'hand.safetensors'}"],
                        torch_compile=args.mode == "gates+compile", **common)
    else:
        c = TrainConfig(stage="expert", output_name="e", network_dim=args.rank, network_alpha=args.rank, **common)
    validate(c)
    run = Run(c)
    run.precache()

    def base_step():
        """The base UNet's forward and backward on the same kind of batch (MoLE's hooks off; gradient to the
        input, so backward runs through the whole UNet as a training step's does)."""
        run.stage.state.active = False
        try:
            batch = run.next_batch()
            x0, cond = run.latents(batch), run.text(batch.captions, batch.size)
            noise = torch.randn(x0.shape, generator=run.gen)
            t = torch.randint(0, 1000, (x0.shape[0],), generator=run.gen)
            x_t = run.base.noisy(x0, noise, t).requires_grad_(True)
            loss = ((run.base.predict(x_t, t, cond) - noise) ** 2).mean()
            loss.backward()
        finally:
            run.stage.state.active = True

    steps = {"base": base_step} if args.mode == "base" else {"base": base_step, args.mode: run.step}
    if args.mode == "gates+compile":       # the eager base step too, in the same process: the fair comparison
        compiled = run.base._compiled

        def eager(step):
            def call():
                run.base._compiled = None
                try:
                    step()
                finally:
                    run.base._compiled = compiled
            return call
        steps["eager base"], steps["eager gates"] = eager(base_step), eager(run.step)
    warm = time.perf_counter()
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    times, in_steps = {name: [] for name in steps}, 0
    with torch.inference_mode(False), torch.enable_grad():
        for step in steps.values():
            for _ in range(3):
                step()
        warm = time.perf_counter() - warm
        for i in range(args.steps):
            for name in (list(steps) if i % 2 == 0 else list(steps)[::-1]):     # interleaved, alternating order
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
                in_steps = max(in_steps, process.memory_info().rss)
    median = statistics.median(times[args.mode])
    ratio = statistics.median(a / b for a, b in zip(times[args.mode], times["base"]))
    eager = statistics.median(a / b for a, b in zip(times[args.mode], times.get("eager base", times["base"])))
    if "eager gates" in times:
        print(json.dumps({"eager gates x eager base": statistics.median(
            a / b for a, b in zip(times["eager gates"], times["eager base"]))}), file=sys.stderr)
    return {"mode": args.mode, "seconds": median, "samples_per_s": args.batch / median, "x_base": ratio,
            "x_eager_base": eager,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_rss_mib": (in_steps - before) / 2**20, "warm_up_s": warm}


def prepare(work: Path, args) -> None:
    from comfyui_mole.trainer.harness.host import use_comfy

    use_comfy()
    from comfyui_mole.trainer.harness.tiny_models import write_detectable_checkpoint, write_stand_in_files

    write_detectable_checkpoint(work / "base.safetensors")
    write_stand_in_files("SD15", {"face": work / "face.safetensors", "hand": work / "hand.safetensors",
                                  "gates": work / "unused_gates.safetensors"}, rank=args.rank)
    make_inputs(work, args.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="the modes to measure")
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp), args)
        results = {}
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--mode", mode, "--work", tmp, "--size", str(args.size), "--batch",
                   str(args.batch), "--rank", str(args.rank), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[mode] = json.loads(out)
    print(f"detectable SD1.5 checkpoint, {args.size}x{args.size} images, batch {args.batch}, rank {args.rank}, "
          f"median of {args.steps} steps")
    print("peak RSS: the whole process (loading the checkpoint dominates); +RSS in steps: the most the process "
          "grew while training, over its size after loading and caching")
    print("x base step: the median over steps of a step's time over the base step's next to it, in the same process "
          "(interleaved, alternating order: this machine's speed drifts too much between processes)")
    print("gates+compile: --torch_compile; x base step: against the base step through the same compiled UNet; x "
          "eager base: against the plain base step, timed in the same process too; warm-up: the first 3 steps of "
          "each kind (the compile)")
    print(f"{'mode':14} {'s/step':>8} {'samples/s':>10} {'peak RSS MiB':>13} {'+RSS in steps':>14} {'x base step':>12} "
          f"{'x eager base':>13} {'warm-up s':>10}")
    for mode, r in results.items():
        print(f"{mode:14} {r['seconds']:8.3f} {r['samples_per_s']:10.2f} {r['peak_rss_mib']:13.0f} "
              f"{r['step_rss_mib']:14.0f} {r['x_base']:12.2f} {r['x_eager_base']:13.2f} {r['warm_up_s']:10.1f}")


if __name__ == "__main__":
    main()
