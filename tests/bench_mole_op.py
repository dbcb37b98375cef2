"""Benchmark: the cost of MoLE on one full-size SD1.5 UNet call (random weights, CPU, batch 2).

Two rank-256 experts on all 192 layers. Variants, timed interleaved (each repetition runs every variant once,
in rotated order), reported as the median over repetitions of each variant's time over the base's time in the same
repetition:
  base      the UNet alone
  mole      ours (mole_ops fused op through forward hooks)
  +trace    ours with gate-trace recording on
  authors   the authors' code structure: per expert down then up, local gate as its own Linear, global gate
            pooled over that expert's output (a baseline for comparison, not used anywhere else)
  peft      two unmerged LoRAs without gates (separate down/up per adapter, added to the output)
  face only the ablation's face-only node: the same two-expert MoLE, mode both, hand at strength 0
  one fixed one expert (the face one) at fixed scale, no gates (MoLE Expert at Fixed Scale): face only / one fixed
            is what an idle expert still costs
FLOP ratios are counted with torch's FlopCounterMode on the same calls (attention included, see
attention_flops_on_cpu); the authors' and peft's are the low-rank count, ours is lower where experts run dense.
Below each row: the recorder's own time (summed inside GateTrace's methods) as a share of a traced call, which is
steadier than the +trace/mole ratio on a noisy machine; the cost each variant adds to the base call, and the
ratio of the authors' to ours (authors/mole can never exceed authors/base: on a CPU where a bf16 base call is
slow, that bound is low, and the added costs compare the expert structures themselves); and how far the +trace
and authors outputs are from ours (max abs difference over the max abs change the experts make to the base
output). In fp32 that checks that the variants compute the same thing; in bf16 it is rounding (on a CPU without
bf16 units ours runs the experts in fp32 and rounds once, the authors' structure rounds every step in bf16).

    make bench            (or: .venv/bin/python tests/bench_mole_op.py --reps 5 --min-seconds 20)
Each config runs at least --reps interleaved repetitions and enough of them for --min-seconds of base calls (this
machine's speed drifts by 20% between minutes; a 2 s call needs about 10 repetitions for a steady median).
The first config's figures are also the quickest check: --configs fp32:32 takes about 2 minutes.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
sys.path.insert(0, str(ROOT / "tests" / "ops"))
spec = importlib.util.spec_from_file_location("comfyui_mole", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
sys.modules["comfyui_mole"] = pkg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pkg)

from comfyui_mole.mole_ops.hooks import HookState, attach  # noqa: E402
from comfyui_mole.mole_ops.layout import SD15  # noqa: E402
from comfyui_mole.mole_ops.mixture import build  # noqa: E402
from comfyui_mole.mole_ops.ops import GateSettings, compute_dtype  # noqa: E402
from comfyui_mole.mole_ops.trace import COND, UNCOND, GateTrace  # noqa: E402
from comfyui_mole.trainer.harness.host import use_comfy  # noqa: E402


class AuthorsLayer(nn.Module):
    """The authors' structure for one layer: experts as Linear/1x1-conv pairs, gates as separate modules."""

    def __init__(self, mole_layer, conv: bool):
        super().__init__()
        self.conv = conv
        self.names = mole_layer.order
        self.down, self.up, self.scale, self.glob = nn.ModuleList(), nn.ModuleList(), [], nn.ModuleList()
        for n in self.names:
            e = mole_layer.experts[n]
            d, u = nn.Linear(e.down.shape[1], e.rank, bias=False), nn.Linear(e.rank, e.up.shape[0], bias=False)
            d.weight.data, u.weight.data = e.down.data.clone(), e.up.data.clone()
            self.down.append(d)
            self.up.append(u)
            self.scale.append(e.scale)
            g = nn.Linear(e.up.shape[0], 1)
            g.load_state_dict(mole_layer.global_gate[n].state_dict())
            self.glob.append(g)
        self.local = nn.Linear(mole_layer.d_in, len(self.names))
        self.local.load_state_dict(mole_layer.local_gate.state_dict())

    def forward(self, x, y):
        if self.conv:
            b, c, h, w = x.shape
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        local = torch.sigmoid(self.local(x))
        out = 0
        for i in range(len(self.names)):
            r = self.up[i](self.down[i](x)) * self.scale[i]
            g = torch.sigmoid(self.glob[i](r.mean(dim=1)))
            out = out + local[..., i:i + 1] * g[:, None, :] * r
        if self.conv:
            out = out.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return y + out


class PeftLayer(nn.Module):
    """Two unmerged LoRA adapters, no gates: y + sum_i scale_i * up_i(down_i(x))."""

    def __init__(self, mole_layer, conv: bool):
        super().__init__()
        self.conv = conv
        self.downs = nn.ParameterList([e.down.data.clone() for e in mole_layer.experts.values()])
        self.ups = nn.ParameterList([e.up.data.clone() for e in mole_layer.experts.values()])
        self.scales = [e.scale for e in mole_layer.experts.values()]

    def forward(self, x, y):
        for down, up, scale in zip(self.downs, self.ups, self.scales):
            if self.conv:
                y = y + scale * nn.functional.conv2d(nn.functional.conv2d(x, down[:, :, None, None]),
                                                     up[:, :, None, None])
            else:
                y = y + scale * nn.functional.linear(nn.functional.linear(x, down), up)
        return y


def baseline_modules(root, mole, cls, dtype) -> dict[str, nn.Module]:
    modules = dict(root.named_modules())
    return {key: cls(layer, modules[key].weight.ndim == 4).to(dtype).requires_grad_(False)
            for key, layer in mole.items()}


def attach_modules(root, per_layer):
    modules = dict(root.named_modules())
    return [modules[key].register_forward_hook(lambda mod, args, out, m=m: m(args[0], out))
            for key, m in per_layer.items()]


def make_mole(unet_root, dtype):
    """(the two-expert MoLE, its experts)."""
    from mole_fakes import fake_expert, fake_gates

    modules = dict(unet_root.named_modules())
    shapes = {k: (modules[k].weight.shape[1], modules[k].weight.shape[0], modules[k].weight.ndim == 4)
              for k in SD15.layer_keys}
    experts = [fake_expert("face", shapes, rank=256, alpha=64, seed=1),
               fake_expert("hand", shapes, rank=256, alpha=128, seed=2)]
    # A trained expert changes a layer's weight by a small fraction; random rank-256 factors change it by several
    # times the weight itself, and 192 such layers in a row make the UNet's output chaotic (a 1e-6 change of the
    # input moves it by more than its own size). Scale each expert's delta to 10% of the layer weight's spread, so
    # the variants' outputs can be compared (the timing does not depend on it).
    with torch.no_grad():
        for e in experts:
            for name, w in e.layers.items():
                spread = modules[SD15.name_map[name]].weight.float().std()
                w.up.mul_(0.1 * spread / ((w.up.float() @ w.down.float()) * w.alpha / w.down.shape[0]).std())
    return build(experts, fake_gates(experts), SD15), experts


class TimedTrace(GateTrace):
    """The gate trace, with the time spent inside its methods summed (the recorder's own share of a call)."""

    seconds = 0.0

    def _timed(self, method, *args):
        start = time.perf_counter()
        method(*args)
        self.seconds += time.perf_counter() - start

    def begin_call(self, *args):
        self._timed(super().begin_call, *args)

    def record(self, *args):
        self._timed(super().record, *args)

    def end_call(self):
        self._timed(super().end_call)


def attention_flops_on_cpu() -> dict:
    """FlopCounterMode counts nothing for the CPU kernel of scaled_dot_product_attention (ComfyUI's attention on
    a CPU): count it like the GPU kernels, 4 * B * heads * n_q * n_kv * head_dim."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


def mole_flops(root, mole, settings, call) -> int:
    """2 * tokens * (K * d_in + R * d_out) summed over the MoLE layers of one call (K = fused first-matmul rows;
    no R * d_out term on layers whose frozen experts run dense)."""
    total = 0
    modules = dict(root.named_modules())

    def count(layer):
        def hook(module, args, out):
            nonlocal total
            x = args[0]
            f = layer.fused(settings, x.device, compute_dtype(x))
            tokens = x.numel() // layer.d_in
            up = 0 if f.up is None else f.rank_total * layer.d_out     # dense experts: no up projection
            total += 2 * tokens * (f.w1.shape[0] * layer.d_in + up)
        return hook

    handles = [modules[k].register_forward_hook(count(layer)) for k, layer in mole.items()]
    call()
    for h in handles:
        h.remove()
    return total


def bench(model, dtype, size, reps, min_seconds, device="cpu"):
    root, unet = model.model, model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=gen).to(device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = torch.randn(2, 77, 768, generator=gen).to(device=device, dtype=dtype)
    mole, experts = make_mole(root, dtype)
    trace = TimedTrace(mole.order)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def call():
        with torch.inference_mode():
            out = unet(x, t, context=ctx)
        sync()
        return out

    def traced_call():
        trace.begin_call(0, (size, size), [COND, UNCOND])
        out = call()
        trace.end_call()
        return out

    variants = {}
    state = HookState(GateSettings("both"))

    def with_hooks(make):
        def run(fn=call):
            handles = make()
            try:
                return fn()
            finally:
                for h in handles:
                    h.remove()
        return run

    variants["base"] = call
    variants["mole"] = with_hooks(lambda: attach(root, mole, state))
    traced_state = HookState(GateSettings("both"), trace=trace)
    variants["+trace"] = lambda: with_hooks(lambda: attach(root, mole, traced_state))(traced_call)
    authors = {k: m.to(device) for k, m in baseline_modules(root, mole, AuthorsLayer, dtype).items()}
    peft = {k: m.to(device) for k, m in baseline_modules(root, mole, PeftLayer, dtype).items()}
    face_only = HookState(GateSettings("both", {"face": 1.0, "hand": 0.0}))
    variants["face only"] = with_hooks(lambda: attach(root, mole, face_only))
    one = build(experts[:1], None, SD15)
    one_state = HookState(GateSettings("none"))
    variants["one fixed"] = with_hooks(lambda: attach(root, one, one_state))
    variants["authors"] = with_hooks(lambda: attach_modules(root, authors))
    variants["peft"] = with_hooks(lambda: attach_modules(root, peft))

    flops, outputs = {}, {}
    for name, fn in variants.items():
        outputs[name] = fn().float()  # warm-up (and builds the fused cache)
        with FlopCounterMode(display=False, custom_mapping=attention_flops_on_cpu()) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    # FlopCounterMode does not see the in-place addmm_ our op accumulates with: count our matmuls from shapes.
    flops["mole"] = flops["+trace"] = flops["base"] + mole_flops(root, mole, state.settings, call)
    start = time.perf_counter()
    call()
    reps = max(reps, math.ceil(min_seconds / (time.perf_counter() - start)))
    times = {name: [] for name in variants}
    names = list(variants)
    recorder = []
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:   # each variant takes every position
            trace.seconds = 0.0
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
            if name == "+trace":
                recorder.append(trace.seconds / times[name][-1])
    # how far ours and the authors' structure agree, against how far the experts move the output
    effect = (outputs["mole"] - outputs["base"]).abs().max().item()
    agreement = {n: (outputs[n] - outputs["mole"]).abs().max().item() / effect for n in ("+trace", "authors")}
    return times, flops, mole, reps, statistics.median(recorder), agreement


def paired(times: dict, a: str, b: str) -> float:
    """Median over repetitions of time a / time b within the same repetition (cancels the machine's drift)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def extra(times: dict, a: str, b: str) -> float:
    """Median over repetitions of (a - base) / (b - base): how much more a adds to the base call than b does."""
    return statistics.median((x - z) / (y - z) for x, y, z in zip(times[a], times[b], times["base"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=20.0)
    parser.add_argument("--configs", default="fp32:32,bf16:32,bf16:64", help="dtype:latent size, comma-separated; "
                        "dtype fp32, bf16 or fp16")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (tests/gpu_check.py)")
    args = parser.parse_args()
    use_comfy(cpu=args.device == "cpu")
    from comfyui_mole.trainer.harness.tiny_models import full_sd15

    torch.manual_seed(0)
    models = {}
    where = torch.cuda.get_device_name() if args.device != "cpu" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, batch 2, two rank-256 experts x 192 layers, "
          f"medians of at least {args.reps} interleaved repetitions and {args.min_seconds:g} s of base calls")
    header = f"{'config':<11}{'base s':>8}" + "".join(f"{n:>16}" for n in ("mole", "+trace", "authors", "peft"))
    print(header + f"{'FLOP mole/base':>16}{'trace ovh':>11}{'authors/mole':>14}")
    for cfg in args.configs.split(","):
        dtype_name, size = cfg.split(":")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        if dtype not in models:
            models.clear()
            models[dtype] = full_sd15(seed=0, dtype=dtype)
            models[dtype].model.to(args.device)
        times, flops, mole, reps, recorder, agreement = bench(models[dtype], dtype, int(size), args.reps,
                                                               args.min_seconds, args.device)
        row = f"{dtype_name} {size}x{size}".ljust(11) + f"{statistics.median(times['base']):>8.3f}"
        for n in ("mole", "+trace", "authors", "peft"):
            row += f"{paired(times, n, 'base'):>9.2f}x{flops[n] / flops['base']:>5.2f}F"
        row += f"{flops['mole'] / flops['base']:>16.3f}{(paired(times, '+trace', 'mole') - 1) * 100:>10.1f}%"
        row += f"{paired(times, 'authors', 'mole'):>13.2f}x"
        print(row, flush=True)
        cache = mole.nbytes()["frozen"]
        print(f"{'':11}{reps} repetitions; frozen stacks: {cache / 2**20:.0f} MiB; process peak RSS so far "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)
        print(f"{'':11}cost added to the base call: authors' {paired(times, 'authors', 'base') - 1:.2f}, ours "
              f"{paired(times, 'mole', 'base') - 1:.2f} of a base call: the authors' adds "
              f"{extra(times, 'authors', 'mole'):.1f}x what ours adds (authors/mole is bounded by authors/base)",
              flush=True)
        print(f"{'':11}the ablation's face-only node: {paired(times, 'face only', 'one fixed'):.3f}x the time of one "
              f"expert at fixed scale ({paired(times, 'face only', 'base'):.2f}x and "
              f"{paired(times, 'one fixed', 'base'):.2f}x the base call)", flush=True)
        print(f"{'':11}recorder's own time: {recorder * 100:.2f}% of a traced call; outputs differ from ours by "
              f"{agreement['+trace']:.1e} (+trace), {agreement['authors']:.1e} (authors) of the experts' effect",
              flush=True)
    print("time ratios: medians over repetitions of the ratio within one repetition; 'F' = counted FLOP ratio "
          "over base; authors/mole > 1: ours is faster")


if __name__ == "__main__":
    main()
