"""Benchmark: the cost of an EMoE score next to one plain generation (20 steps, CFG 7.5), 4 expert members.

  plain      the generation alone
  separate   the generation, plus the score as its own pass (MoLE Uncertainty Score: one batched first step)
  early      the generation with the score computed inside its first step (MoLE Uncertainty Early Estimate)
On the detectable SD1.5 checkpoint (CPU), stand-in rank-R experts; medians of interleaved repetitions.

    .venv/bin/python tests/bench_emoe.py [--size 256] [--reps 3]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
spec = importlib.util.spec_from_file_location("comfyui_mole", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
sys.modules["comfyui_mole"] = pkg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pkg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    from comfyui_mole.trainer.harness.host import use_comfy

    use_comfy()
    import torch

    import comfy.sd
    import nodes
    from comfyui_mole.mole_ops.emoe import DISAGREEMENT
    from comfyui_mole.mole_ops.ops import GateSettings
    from comfyui_mole.nodes.patch import EarlyEstimate, MoLEPatch, attach_early_estimate
    from comfyui_mole.nodes.uncertainty import ExpertEnsemble, score
    from comfyui_mole.trainer.harness.tiny_models import write_detectable_checkpoint, write_stand_in_files

    roles = ("face", "hand", "feet", "body")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_detectable_checkpoint(Path(tmp) / "base.safetensors")
        paths = {r: Path(tmp) / f"{r}.safetensors" for r in roles} | {"gates": Path(tmp) / "gates.safetensors"}
        experts, _ = write_stand_in_files("SD15", paths, rank=args.rank)
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt))
    positive = nodes.CLIPTextEncode().encode(clip, "a smiling person waving")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

    def generate(m):
        with torch.inference_mode():
            nodes.common_ksampler(m, 0, 20, 7.5, "euler", "normal", positive, negative, latent)

    def plain():
        generate(model)

    def separate():
        generate(model)
        score(ExpertEnsemble(model, tuple(experts)), positive, latent["samples"], 0)

    def early():
        from comfyui_mole.mole_ops.mixture import build
        from comfyui_mole.nodes.apply import model_layout

        mole = build(list(experts), None, model_layout(model))
        estimate = EarlyEstimate(MoLEPatch(mole, GateSettings("none")), len(roles), DISAGREEMENT)
        generate(attach_early_estimate(model, estimate))
        assert estimate.result is not None

    modes = {"plain": plain, "separate": separate, "early": early}
    for fn in modes.values():      # warm-up
        fn()
    times = {k: [] for k in modes}
    for _ in range(args.reps):
        for name, fn in modes.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["plain"])
    print(f"detectable SD1.5, {args.size}x{args.size}, 20 steps CFG 7.5, {len(roles)} expert members of rank "
          f"{args.rank}, median of {args.reps}")
    for name in modes:
        m = statistics.median(times[name])
        print(f"{name:9} {m:7.2f} s   {m / base:5.3f}x plain")


if __name__ == "__main__":
    main()
