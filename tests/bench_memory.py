"""Benchmark: MoLE's resident memory per Apply MoLE node, and the peak of a five-node ablation on a full UNet.

1. Resident bytes that Apply MoLE nodes add beyond the loaded files: copies of the experts, the gates, and the
   cached stacks the op computes with, for one node (gates both, both experts) and for five nodes on the same
   files (the ablation workflow's five settings: both, face only, hand only, local, global). Two rank-256 experts on the SD1.5 (192
   layers) and the full-size SDXL layout (722 layers); sizes only: the tensors live on torch's meta device, so
   SDXL needs no memory. dtype = the files' dtype = the dtype the UNet computes in on a device with native half
   precision (a GPU), so the stacks are cached in it.
2. Peak RSS above the loaded model and files, of the five-node ablation on the full-size SD1.5 UNet (random
   weights, CPU, fp32, 32x32 latent, one euler step per node; all five patched models kept, as ComfyUI's cache
   keeps them).

    .venv/bin/python tests/bench_memory.py                      this tree (about 2 minutes)
    .venv/bin/python tests/bench_memory.py --compare e5c9998    and the code at that revision beside it
    .venv/bin/python tests/bench_memory.py --device cuda        table 1 with real tensors on a GPU (tests/gpu_check.py)

Each measurement runs in a subprocess of its own (a clean peak RSS), importing the package from --package.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the ablation workflow's five Apply MoLE settings (mode, face, hand), the plain one first: "1 node" is that one
SETTINGS = (("both", 1.0, 1.0), ("both", 1.0, 0.0), ("both", 0.0, 1.0), ("local", 1.0, 1.0), ("global", 1.0, 1.0))
DTYPES = ("fp32", "fp16", "bf16")
MiB = 2 ** 20


def load_package(root: Path):
    """Import the repository at `root` as package comfyui_mole (as ComfyUI loads it)."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    spec = importlib.util.spec_from_file_location("comfyui_mole", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    sys.modules["comfyui_mole"] = package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)
    return package


def storages(obj, seen: set | None = None) -> dict[int, tuple[str, int]]:
    """{storage id: (kind, bytes)} of every tensor reachable from a MoLE: its parameters (experts, gates, frozen
    stacks) and any cache it keeps in plain attributes (dicts, tuples, dataclasses of tensors)."""
    import torch

    out: dict[int, tuple[str, int]] = {}
    seen = set() if seen is None else seen

    def add(t, kind):
        storage = t.untyped_storage()
        out.setdefault(storage._cdata, (kind, storage.nbytes()))

    def walk(value, kind):
        if isinstance(value, torch.Tensor):
            add(value, kind)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v, kind)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, kind)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), kind)

    for name, p in obj.named_parameters():
        add(p, "experts" if ".experts." in f".{name}" else "gates" if "_gate" in name else "caches")
    for module in obj.modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        for attr in ("_cache", "_stacks"):
            walk(getattr(module, attr, None), "caches")
    return out


def meta_files(layout, dims: dict, dtype, seed: int = 0):
    """Two rank-256 experts (alpha 64 and 128, as the authors') on the meta device, and real gates for them."""
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "ops"))
    from mole_fakes import fake_gates, layer_shapes

    from comfyui_mole.mole_ops.expert_file import ExpertFile, LoRAWeights
    from comfyui_mole.mole_ops.layout import PREFIX, kohya_name

    experts = []
    for name, alpha in (("face", 64.0), ("hand", 128.0)):
        layers = {kohya_name(k[len(PREFIX):]): LoRAWeights(torch.empty(256, d_in, dtype=dtype, device="meta"),
                                                            torch.empty(d_out, 256, dtype=dtype, device="meta"),
                                                            alpha, conv)
                  for k, (d_in, d_out, conv) in layer_shapes(layout, **dims).items()}
        experts.append(ExpertFile(name, layers, sha256=f"meta-{name}-{dtype}-{seed}", path=f"{name}.safetensors"))
    small = [ExpertFile(e.name, {k: LoRAWeights(torch.empty(1, w.down.shape[1]), torch.empty(w.up.shape[0], 1),
                                                w.alpha, w.conv) for k, w in e.layers.items()}) for e in experts]
    gates = fake_gates(small, seed=seed)
    gates.sha256, gates.path = f"meta-gates-{dtype}-{seed}", "gates.safetensors"
    return experts, gates


def one_node(mixture, experts, gates, layout):
    """What one Apply MoLE node of this code builds from the files."""
    make = getattr(mixture, "shared", None) or mixture.build     # shared: one per set of files; build: per node
    return make(list(experts), gates, layout)


def table1(device: str) -> dict:
    """{layout/dtype: {nodes: {kind: bytes}}}: bytes beyond the files, for 1 and 5 nodes."""
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "ops"))
    from mole_fakes import SD15_DIMS, SDXL_DIMS

    from comfyui_mole.mole_ops import mixture
    from comfyui_mole.mole_ops.layout import SD15, SDXL
    from comfyui_mole.mole_ops.ops import GateSettings

    results = {}
    for layout, dims in ((SD15, SD15_DIMS), (SDXL, SDXL_DIMS)):
        for name in DTYPES:
            dtype = getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[name])
            experts, gates = meta_files(layout, dims, dtype)
            if device != "meta":
                for e in experts:
                    for w in e.layers.values():
                        w.down, w.up = (torch.randn_like(w.down, device=device) * 1e-3,
                                        torch.randn_like(w.up, device=device) * 1e-3)
            files: dict[int, int] = {}
            for e in experts:
                for w in e.layers.values():
                    files.update(storages_of(w.down, w.up))
            row, moles = {}, []
            for count, (mode, face, hand) in enumerate(SETTINGS, start=1):
                mole = one_node(mixture, experts, gates, layout)
                mole.to(device)
                settings = GateSettings(mode, {"face": face, "hand": hand})
                with torch.inference_mode():
                    for layer in mole.layers.values():
                        layer.fused(settings, torch.device(device), dtype)
                moles.append(mole)
                if count in (1, len(SETTINGS)):
                    found: dict[int, tuple[str, int]] = {}
                    seen: set = set()
                    for m in moles:
                        found.update(storages(m, seen))
                    kinds = {"experts": 0, "gates": 0, "caches": 0}
                    for key, (kind, size) in found.items():
                        if key not in files:
                            kinds[kind] += size
                    row[count] = kinds
            results[f"{layout.name} {name}"] = {"files": sum(size for size in files.values()), **{
                str(k): v for k, v in row.items()}}
            del moles
    return results


def storages_of(*tensors) -> dict[int, int]:
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}


def full_size_files(model) -> tuple[list, object]:
    """Two rank-256 experts (alpha 64 and 128) and gates for a full-size SD1.5 model, with file hashes set as the
    loader nodes would (so Apply MoLE shares them)."""
    sys.path.insert(0, str(ROOT / "tests" / "ops"))
    from mole_fakes import fake_expert, fake_gates

    from comfyui_mole.mole_ops.layout import SD15

    modules = dict(model.model.named_modules())
    shapes = {k: (modules[k].weight.shape[1], modules[k].weight.shape[0], modules[k].weight.ndim == 4)
              for k in SD15.layer_keys}
    experts = [fake_expert("face", shapes, rank=256, alpha=64, seed=1),
               fake_expert("hand", shapes, rank=256, alpha=128, seed=2)]
    for e in experts:
        e.sha256, e.path = f"full-size-{e.name}", f"{e.name}.safetensors"
    gates = fake_gates(experts)
    gates.sha256, gates.path = "full-size-gates", "gates.safetensors"
    return experts, gates


def table2() -> dict:
    """Peak RSS above the loaded UNet and files of the five-node ablation (CPU, fp32)."""
    import psutil
    import torch

    from comfyui_mole.trainer.harness.host import use_comfy

    use_comfy(cpu=True)
    import comfy.sample

    from comfyui_mole.nodes.apply import ApplyMoLE
    from comfyui_mole.trainer.harness.tiny_models import full_sd15

    model = full_sd15(seed=0, dtype=torch.float32)
    experts, gates = full_size_files(model)
    gen = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(1, 4, 32, 32)
    noise = torch.randn(latent.shape, generator=gen)
    with torch.inference_mode():       # the base model loaded and run once before anything of MoLE
        comfy.sample.sample(model, noise, 1, 1.0, "euler", "normal", positive, positive, latent, disable_pbar=True,
                            seed=0)
    before = psutil.Process().memory_info().rss
    kept = []
    for mode, face, hand in SETTINGS:
        out = ApplyMoLE.execute(model=model, experts=tuple(experts), mode=mode, strength_1=face, strength_2=hand,
                                strength_3=1.0, start_percent=0.0, end_percent=1.0, record_trace=False, gates=gates)
        patched = out.result[0]
        with torch.inference_mode():
            comfy.sample.sample(patched, noise, 1, 1.0, "euler", "normal", positive, positive, latent,
                                disable_pbar=True, seed=0)
        kept.append(patched)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"base_rss": before, "peak_rss": peak, "added": peak - before}


def run_child(package: Path, what: str, device: str) -> dict:
    env = dict(os.environ)
    if "COMFYUI_PATH" not in env and (ROOT / ".host" / "ComfyUI").is_dir():     # a checkout has no host of its own
        env["COMFYUI_PATH"] = str(ROOT / ".host" / "ComfyUI")
    done = subprocess.run([sys.executable, __file__, "--package", str(package), "--child", what, "--device", device],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{what} for {package} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def checkout(rev: str):
    """The repository at `rev` in a temporary git worktree."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=True)


def report(trees: dict[str, dict], device: str) -> None:
    names = list(trees)
    print(f"1. bytes Apply MoLE nodes keep beyond the loaded files (two rank-256 experts; {device} tensors), MiB")
    head = f"{'layout dtype':<13}{'files':>8}"
    for n in names:
        head += f" | {n + ': experts gates caches':>34}{'1 node':>9}{'5 nodes':>9}{'5/1':>6}"
    print(head)
    for row in trees[names[0]]["table1"]:
        line = f"{row:<13}{trees[names[0]]['table1'][row]['files'] / MiB:>8.0f}"
        for n in names:
            r = trees[n]["table1"][row]
            one, five = sum(r["1"].values()), sum(r["5"].values())
            line += (f" | {r['1']['experts'] / MiB:>16.0f}{r['1']['gates'] / MiB:>9.1f}{r['1']['caches'] / MiB:>9.0f}"
                     f"{one / MiB:>9.0f}{five / MiB:>9.0f}{five / max(one, 1):>6.2f}")
        print(line)
    if all("table2" in t for t in trees.values()):
        print("2. five-node ablation on the full-size SD1.5 UNet (CPU, fp32, 32x32, one step each): peak RSS above "
              "the loaded UNet")
        for n in names:
            t = trees[n]["table2"]
            print(f"   {n:<10} base {t['base_rss'] / 2**30:.2f} GiB, peak {t['peak_rss'] / 2**30:.2f} GiB, added "
                  f"{t['added'] / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", help="a git revision to measure beside this tree")
    parser.add_argument("--device", default="meta", help="meta (sizes only), cpu or cuda, for table 1")
    parser.add_argument("--no-rss", action="store_true", help="skip table 2 (the full-UNet run)")
    parser.add_argument("--package", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("table1", "table2"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        load_package(args.package.resolve())
        print(json.dumps(table1(args.device) if args.child == "table1" else table2()))
        return
    with contextlib.ExitStack() as stack:
        trees = {"this tree": ROOT}
        if args.compare:
            trees = {args.compare: stack.enter_context(checkout(args.compare)), "this tree": ROOT}
        results = {}
        for name, path in trees.items():
            results[name] = {"table1": run_child(path, "table1", args.device)}
            if not args.no_rss:
                results[name]["table2"] = run_child(path, "table2", args.device)
        report(results, args.device)


if __name__ == "__main__":
    main()
