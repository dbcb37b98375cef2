"""Benchmark: MoLE at the rank its experts use, on one full-size SD1.5 UNet call (random weights, batch 2).

Two rank-256 experts on all 192 layers (alpha 64 and 128, as the authors'), reduced by the loaders' rank rules
(mole_ops/rank.py): full, 99% and 95% energy, fixed 128 / 64 / 32. For each rule: the ranks kept (mean over
layers), the op's time as a ratio to the base call (interleaved repetitions, median of the ratio within a
repetition), the UNet output's error against full rank (||out - out_full|| over ||out_full|| and over the experts'
own change ||out_full - out_base||), and the frozen stack's memory: SD1.5 as built, SDXL (722 layers, fp16) from
meta tensors at the ranks the same rule keeps on that layout.

Spectra. No trained full-size SD LoRA can be downloaded here, so the singular values of the experts' deltas are
generated: "decaying" as s_i = (i + 1) ** -p with p fitted (least squares of log s against log (i + 1)) to the
demo's trained experts (rank 16, every layer of both experts; `--spectrum-from face.safetensors hand.safetensors`
fits it again, e.g. on your own trained LoRAs); "flat" as Gaussian random factors (every singular value of the same
order), the worst case for any reduction. Each layer's delta is then scaled to 10% of its weight's spread, as in
bench_mole_op.py (random rank-256 deltas of the weight's own size make 192 patched layers chaotic).

    .venv/bin/python tests/bench_rank.py                 (about 10 minutes on 2 cores; --quick: 1 repetition)
    .venv/bin/python tests/bench_rank.py --device cuda   (tests/gpu_check.py)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mole_op import paired  # noqa: E402  (its import also sets up the package, as every bench does)

from comfyui_mole.mole_ops.expert_file import ExpertFile, LoRAWeights  # noqa: E402
from comfyui_mole.mole_ops.hooks import HookState, attach  # noqa: E402
from comfyui_mole.mole_ops.layout import SD15, SDXL  # noqa: E402
from comfyui_mole.mole_ops.mixture import build  # noqa: E402
from comfyui_mole.mole_ops.ops import GateSettings  # noqa: E402
from comfyui_mole.mole_ops.rank import RankRule, factor, factors, reduce  # noqa: E402
from comfyui_mole.trainer.harness.host import use_comfy  # noqa: E402

RULES = ("full", "99% energy", "95% energy", "128", "64", "32")
# p of s_i = (i + 1) ** -p fitted on the demo's trained experts (seed 0, rank 16, 2026-12-04: 1.356; their first
# singular values relative to the largest: face 1, 0.58, 0.39, 0.23, ... 0.05; `--spectrum-from` refits it). At
# rank 256 this is an extrapolation from 16 values: no trained full-size LoRA is here to measure.
DEMO_DECAY = 1.36


def fit_decay(paths: list[str]) -> float:
    """The power-law exponent of the singular values of every layer of these LoRAs (least squares on the
    log-log values, each layer normalised by its largest singular value; values below 1e-6 of it left out)."""
    from comfyui_mole.mole_ops import expert_file

    xs, ys = [], []
    for path in paths:
        for w in expert_file.load(path, "expert").layers.values():
            s = factor(w)[1].double()
            s = s / s[0]
            keep = s > 1e-6
            xs.append(torch.log(torch.arange(1, len(s) + 1, dtype=torch.float64)[keep]))
            ys.append(torch.log(s[keep]))
    x, y = torch.cat(xs), torch.cat(ys)
    return float(-((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


@torch.no_grad()
def experts_with_spectrum(root, spectrum: str, decay: float, seed: int = 0) -> list[ExpertFile]:
    """Two rank-256 experts on every MoLE layer of `root` with the given spectrum, deltas at 10% of the spread."""
    modules = dict(root.named_modules())
    gen = torch.Generator().manual_seed(seed)
    experts = []
    for name, alpha in (("face", 64.0), ("hand", 128.0)):
        layers = {}
        for key in SD15.layer_keys:
            weight = modules[key].weight
            d_out, d_in = weight.shape[0], weight.shape[1]
            if spectrum == "flat":
                up, down = torch.randn(d_out, 256, generator=gen), torch.randn(256, d_in, generator=gen)
            else:
                qu, _ = torch.linalg.qr(torch.randn(d_out, 256, generator=gen))
                qd, _ = torch.linalg.qr(torch.randn(d_in, 256, generator=gen))
                up, down = qu * torch.arange(1, 257, dtype=torch.float32) ** -decay, qd.T.contiguous()
            delta_std = ((up @ down) * alpha / 256).std()
            up = up * (0.1 * weight.float().std().item() / delta_std.item())
            kohya = next(k for k, v in SD15.name_map.items() if v == key)
            layers[kohya] = LoRAWeights(down, up.contiguous(), alpha, weight.ndim == 4)
        experts.append(ExpertFile(name, layers, sha256=f"bench-{spectrum}-{name}-{seed}"))
    return experts


def sdxl_stack_mib(rule: RankRule, spectrum: str, decay: float) -> float:
    """The frozen fp16 stack of two rank-256 SDXL experts at the ranks `rule` keeps, from meta tensors (the
    spectrum is the same on every layer, so is the rank it keeps)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "ops"))
    from mole_fakes import SDXL_DIMS, fake_gates, layer_shapes

    s = torch.ones(256) if spectrum == "flat" else torch.arange(1, 257, dtype=torch.float64) ** -decay
    experts = []
    for name in ("face", "hand"):
        layers = {}
        for key, (d_in, d_out, conv) in layer_shapes(SDXL, **SDXL_DIMS).items():
            k = rule.keep(s, 256, min(d_in, d_out))
            layers["lora_unet_" + key[len("diffusion_model."):].replace(".", "_")] = LoRAWeights(
                torch.empty(k, d_in, dtype=torch.float16, device="meta"),
                torch.empty(d_out, k, dtype=torch.float16, device="meta"), 64.0, conv)
        experts.append(ExpertFile(name, layers))
    gates = fake_gates([ExpertFile(e.name, {n: LoRAWeights(torch.zeros(1, w.down.shape[1]), torch.zeros(
        w.up.shape[0], 1), 1.0) for n, w in e.layers.items()}) for e in experts])
    mole = build(experts, gates, SDXL, dtype=torch.float16).to("meta")
    mole.freeze(torch.float16, "meta")
    return mole.nbytes()["frozen"] / 2**20


def run(model, spectrum: str, decay: float, reps: int, size: int, device: str) -> list[dict]:
    root, unet = model.model, model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=gen).to(device)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = torch.randn(2, 77, 768, generator=gen).to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    full_experts = experts_with_spectrum(root, spectrum, decay)
    from mole_fakes import fake_gates

    gates = fake_gates(full_experts)

    def call():
        with torch.inference_mode():
            out = unet(x, t, context=ctx)
        sync()
        return out

    variants, moles = {"base": call}, {}
    usv = [factors(e) for e in full_experts]
    for text in RULES:
        rule = RankRule.parse(text)
        experts = [reduce(e, rule, usv=f) for e, f in zip(full_experts, usv)]
        mole = build(experts, gates, SD15)
        mole.freeze(torch.float32, device)
        moles[text] = (mole, experts)
        state = HookState(GateSettings("both"))

        def with_mole(m=mole, s=state):
            handles = attach(root, m, s)
            try:
                return call()
            finally:
                for h in handles:
                    h.remove()
        variants[text] = with_mole
    outputs = {name: fn().float() for name, fn in variants.items()}        # warm-up; builds the stacks
    times = {name: [] for name in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    full, base = outputs["full"], outputs["base"]
    rows = []
    for text in RULES:
        mole, experts = moles[text]
        kept = [w.rank for e in experts for w in e.layers.values()]
        err = (outputs[text] - full).norm().item()
        rows.append({"rule": text, "rank": sum(kept) / len(kept), "time": paired(times, text, "base"),
                     "err_out": err / full.norm().item(), "err_effect": err / (full - base).norm().item(),
                     "mib": mole.nbytes()["frozen"] / 2**20,
                     "sdxl_mib": sdxl_stack_mib(RankRule.parse(text), spectrum, decay)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent size (32: a 256 px picture)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spectra", default="decaying,flat")
    parser.add_argument("--spectrum-from", nargs="+", help="fit the decaying spectrum's exponent on these LoRAs")
    parser.add_argument("--quick", action="store_true", help="one repetition (a smoke run)")
    args = parser.parse_args()
    use_comfy(cpu=args.device == "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "ops"))
    from comfyui_mole.trainer.harness.tiny_models import full_sd15

    decay = fit_decay(args.spectrum_from) if args.spectrum_from else DEMO_DECAY
    source = f"fitted on {', '.join(Path(p).name for p in args.spectrum_from)}" if args.spectrum_from else \
        "fitted on the demo's trained experts (seed 0)"
    torch.manual_seed(0)
    model = full_sd15(seed=0, dtype=torch.float32)
    model.model.to(args.device)
    where = torch.cuda.get_device_name() if args.device != "cpu" else f"{torch.get_num_threads()} threads"
    reps = 1 if args.quick else args.reps
    print(f"torch {torch.__version__}, {where}; full-size SD1.5 UNet fp32, batch 2, {args.size}x{args.size} "
          f"latent; two rank-256 experts x 192 layers; medians of {reps} interleaved repetitions")
    for spectrum in args.spectra.split(","):
        what = f"s_i = (i+1)^-{decay:.2f}, {source}" if spectrum == "decaying" else \
            "Gaussian factors, every singular value of the same order (worst case)"
        print(f"\n{spectrum} spectrum ({what})")
        print(f"{'rank rule':<12}{'mean rank':>10}{'time / base':>13}{'out err':>10}{'effect err':>12}"
              f"{'SD1.5 MiB':>11}{'SDXL fp16 MiB':>15}")
        for r in run(model, spectrum, decay, reps, args.size, args.device):
            print(f"{r['rule']:<12}{r['rank']:>10.1f}{r['time']:>12.3f}x{r['err_out']:>10.1e}{r['err_effect']:>12.1e}"
                  f"{r['mib']:>11.0f}{r['sdxl_mib']:>15.0f}", flush=True)
    print("\nout err: ||out - out_full|| / ||out_full||; effect err: the same over ||out_full - out_base|| (the "
          "experts' own change); MiB: the frozen stacks (SD1.5 fp32 as built; SDXL fp16 from meta tensors)")


if __name__ == "__main__":
    main()
