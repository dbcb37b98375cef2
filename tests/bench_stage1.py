"""Benchmark: stage 1 (`train-base`) throughput and peak memory in 1 and 2 processes on this machine (CPU, gloo).

Each configuration is a real `python -m trainer train-base` run (under torchrun for 2 processes) on the
detectable SD1.5 checkpoint at the same global batch and seed:
  1 process              batch B, torch on every core
  2 processes (torchrun) batch B/2 each, one thread each (torchrun's default), gradients averaged by DDP
  1 process, checkpointed  as the first, with --gradient_checkpointing
Prints seconds per step (steady state: the steps after the first 3, from the run's CSV log), samples/s, and the
peak RSS of each process as the trainer reports it.

    .venv/bin/python tests/bench_stage1.py [--size 64] [--batch 8] [--steps 15]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_trainer import ROOT, make_inputs   # noqa: E402  (also makes the package importable)

WARMUP = 3


def run(work: Path, name: str, processes: int, batch: int, args, extra=()) -> dict:
    out = work / name
    cmd = ["-m", "trainer", "train-base", "--pretrained_model_name_or_path", str(work / "base.safetensors"),
           "--train_data_dir", str(work / "images"), "--resolution", str(args.size), "--train_batch_size",
           str(batch), "--max_train_steps", str(args.steps), "--learning_rate", "1e-5", "--cache_latents",
           "--output_dir", str(out), "--output_name", "base", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *cmd]
    shown = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if shown.returncode:
        raise SystemExit(f"{name} failed:\n{shown.stdout[-3000:]}\n{shown.stderr[-3000:]}")
    rows = [r.split(",") for r in (out / "base_log.csv").read_text().splitlines()[1:]]
    seconds = [float(r[3]) for r in rows]
    per_step = (seconds[-1] - seconds[WARMUP - 1]) / (len(seconds) - WARMUP)
    peaks = re.search(r"peak memory ([\d +]+) MiB", shown.stdout + shown.stderr).group(1)
    return {"name": name, "processes": processes, "seconds": per_step, "samples_per_s": args.batch / per_step,
            "peaks": [float(p) for p in peaks.split("+")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="global batch (even)")
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from comfyui_mole.trainer.harness.host import use_comfy

        use_comfy()
        from comfyui_mole.trainer.harness.tiny_models import write_detectable_checkpoint

        write_detectable_checkpoint(work / "base.safetensors")
        make_inputs(work, args.size, n=2 * args.batch)
        results = [run(work, "1 process", 1, args.batch, args),
                   run(work, "2 processes", 2, args.batch // 2, args),
                   run(work, "1 process, checkpointed", 1, args.batch, args, ["--gradient_checkpointing"])]
    print(f"stage 1 (train-base) on the detectable SD1.5 checkpoint, {args.size}x{args.size}, global batch "
          f"{args.batch}, AdamW, {args.steps} steps (the first {WARMUP} not timed); {os.cpu_count()} CPU cores")
    print(f"{'run':26} {'s/step':>8} {'samples/s':>10} {'x 1 process':>12} {'peak RSS MiB per process':>26}")
    one = results[0]["samples_per_s"]
    for r in results:
        peaks = " + ".join(f"{p:.0f}" for p in r["peaks"])
        print(f"{r['name']:26} {r['seconds']:8.3f} {r['samples_per_s']:10.2f} {r['samples_per_s'] / one:12.2f} "
              f"{peaks:>26}")


if __name__ == "__main__":
    main()
