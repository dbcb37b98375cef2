"""GPU check of the op and its memory: run it whenever a machine with an NVIDIA GPU is at hand (about 4 minutes on
one H200; CI has no GPU and does not run it).

    # on the GPU machine, in this repository, with a CUDA build of torch and ComfyUI's requirements installed:
    COMFYUI_PATH=/path/to/ComfyUI python tests/gpu_check.py

It prints, and fails (exit 1) on any check that does not hold:
1. the op benchmark on the full-size SD1.5 UNet in fp16 and bf16 at 64x64 latent, batch 2: ours, ours with the
   gate trace, the authors' structure and two plain LoRAs (tests/bench_mole_op.py --device cuda);
2. the memory table with real tensors on the GPU (tests/bench_memory.py --device cuda --no-rss);
2b. MoLE at the rank its experts use: time, output error and stack memory per rank rule (tests/bench_rank.py
   --device cuda --size 64);
3. through ComfyUI's own memory management, with five Apply MoLE nodes on one set of files on the full-size
   SD1.5 UNet in fp16: the frozen stacks are in the compute dtype (fp16, not fp32), five nodes allocate at most
   1.1x what one does, the stacks are on the GPU while sampling, and after unload_all_models() no MoLE tensor is
   left on the GPU.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (("both", 1.0, 1.0), ("both", 1.0, 0.0), ("both", 0.0, 1.0), ("local", 1.0, 1.0), ("global", 1.0, 1.0))


def run(script: str, *args: str) -> None:
    print(f"$ {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(ROOT / "tests" / script), *args], check=True)


def memory_management() -> list[str]:
    """Check 3; returns the failures."""
    sys.path.insert(0, str(ROOT / "tests"))
    from bench_memory import full_size_files, load_package

    load_package(ROOT)
    import torch

    from comfyui_mole.trainer.harness.host import use_comfy

    use_comfy(cpu=False)
    import comfy.model_management as mm
    import comfy.sample

    from comfyui_mole.nodes.apply import ApplyMoLE
    from comfyui_mole.trainer.harness.tiny_models import full_sd15

    failures = []
    model = full_sd15(seed=0, dtype=torch.float16)
    experts, gates = full_size_files(model)
    gen = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(2, 4, 64, 64)
    noise = torch.randn(latent.shape, generator=gen)

    def generate(m):
        with torch.inference_mode():
            comfy.sample.sample(m, noise, 2, 5.0, "euler", "normal", positive, positive, latent, disable_pbar=True,
                                seed=0)

    generate(model)
    base = torch.cuda.memory_allocated()
    allocated, kept = [], []
    for mode, face, hand in SETTINGS:
        patched = ApplyMoLE.execute(model=model, experts=tuple(experts), mode=mode, strength_1=face,
                                    strength_2=hand, strength_3=1.0, start_percent=0.0, end_percent=1.0,
                                    record_trace=False, gates=gates).result[0]
        generate(patched)
        kept.append(patched)
        allocated.append(torch.cuda.memory_allocated() - base)
    mole = kept[0].get_attachment("mole").mole
    stacks = [p for layer in mole.layers.values() for p in layer.frozen.parameters()]
    dtypes = {p.dtype for p in stacks}
    devices = {p.device.type for p in stacks}
    print(f"stacks: {mole.nbytes()['frozen'] / 2**20:.0f} MiB in {sorted(map(str, dtypes))} on {sorted(devices)}; "
          f"allocated beyond the base model after 1 and 5 nodes: {allocated[0] / 2**20:.0f} and "
          f"{allocated[-1] / 2**20:.0f} MiB")
    if dtypes != {torch.float16}:
        failures.append(f"stacks are {dtypes}, not the compute dtype fp16")
    if devices != {"cuda"}:
        failures.append(f"stacks are on {devices} after sampling, not on the GPU")
    if allocated[-1] > 1.1 * max(allocated[0], 1):
        failures.append(f"five nodes allocate {allocated[-1] / max(allocated[0], 1):.2f}x one")
    mm.unload_all_models()
    left = {p.device.type for p in stacks} | {p.device.type for p in mole.parameters()}
    print(f"after unload_all_models: MoLE tensors on {sorted(left)}; allocated "
          f"{torch.cuda.memory_allocated() / 2**20:.0f} MiB")
    if "cuda" in left:
        failures.append("a MoLE tensor stayed on the GPU after unload_all_models()")
    return failures


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 1
    run("bench_mole_op.py", "--device", "cuda", "--configs", "fp16:64,bf16:64", "--reps", "5", "--min-seconds", "5")
    run("bench_memory.py", "--device", "cuda", "--no-rss")
    run("bench_rank.py", "--device", "cuda", "--size", "64", "--reps", "5")
    failures = memory_management()
    for failure in failures:
        print(f"FAILED: {failure}")
    print("gpu check:", "failed" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
