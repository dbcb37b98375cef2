"""The gates while MoLE generates: the paper's Fig. 7 in the demo's world, measured.

The shipped txt2img workflow (Apply MoLE with its gate trace, Save MoLE Gate Trace) runs in a real ComfyUI on
captions of face close-ups, hand close-ups and scenes (20 pictures of each in the full demo: recipe.gate_captions
captions x a batch of BATCH seeds, an empty negative prompt). From the saved traces:

- global gates: the mean global gate of each expert per sampling step, per kind of picture (Fig. 7 a-c: the
  matching expert's gate should be higher on close-ups of its part);
- local gates on the generated scenes: the judge finds the face and the hand in each generated picture, and the
  local-gate maps are scored against those masks (ROC AUC at latent resolution, as on held-out scenes:
  evidence.local_gate_report) in three bands of steps (early, middle, late) and over all steps.

Written to results/generated_gates.json and generated_gates.png (measured once; delete them to measure again).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

KINDS = {"face close-ups": "faces", "hand close-ups": "hands", "scenes": "scenes"}
BATCH = 5
DROPPED = ("PreviewAny", "MoLE_GateMaps", "MoLE_GateCurves")     # the views a person looks at; not measured here


def graph(caption: str, seed: int, steps: int, batch: int, prefix: str, cfg: float) -> dict:
    """The shipped txt2img API graph at 64 px with this caption, an empty negative prompt, the guidance scale `cfg`,
    a batch of `batch` seeds from `seed`, and only the image and the trace saved (under `prefix`)."""
    from ..harness.workflows import load_api

    api = load_api("mole_sd15_txt2img", 64, 64, steps, prompt=caption, negative="", cfg=cfg)
    dropped = {k for k, n in api.items() if n["class_type"] in DROPPED}
    dropped |= {k for k, n in api.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"][0] in dropped}
    for key in dropped:
        del api[key]
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "EmptyLatentImage":
            inputs["batch_size"] = batch
        elif kind == "KSampler":
            inputs["seed"] = seed
        elif kind in ("SaveImage", "MoLE_SaveTrace"):
            inputs["filename_prefix"] = prefix + ("_trace" if kind == "MoLE_SaveTrace" else "")
    return api


def generate(server, recipe, seed: int) -> list[dict]:
    """Every run: {"kind", "caption", "images": [paths], "trace": path} (the server's output folder)."""
    from . import world

    runs = []
    for label, kind in KINDS.items():
        rng = random.Random(f"gates-generating:{kind}:{seed}")
        for i in range(recipe.gate_captions):
            caption = world.SETS[kind](rng, 64).caption
            prefix = f"gates_{kind}_{i}"
            outputs = server.run(graph(caption, seed * 1000 + i * BATCH, recipe.sample_steps, BATCH, prefix,
                                       recipe.cfg))
            images = [p for p in server.output_files(outputs) if p.name.startswith(prefix + "_0")]
            (trace,) = sorted(server.base_dir.joinpath("output").glob(f"{prefix}_trace_*.safetensors"))[-1:]
            runs.append({"kind": label, "caption": caption, "images": images, "trace": trace})
    return runs


def bands(steps: int) -> list[tuple[str, slice]]:
    """Three bands of sampling steps (early, middle, late), labelled with their 1-based step numbers."""
    edges = [round(steps * k / 3) for k in range(4)]
    return [(f"{name}: steps {a + 1}-{b}", slice(a, b)) for name, a, b in
            zip(("early", "middle", "late"), edges[:-1], edges[1:]) if b > a]


def measure(runs: list[dict]) -> dict:
    """Global-gate curves per kind and local-gate AUCs on the generated scenes (see the module docstring)."""
    from ...mole_ops import safetensors_io
    from . import judge as judge_mod
    from .evidence import Sample, local_gate_report

    judge = judge_mod.load()
    curves, local, samples, experts = {}, [], [], None
    for run in runs:
        tensors, metadata, _ = safetensors_io.read(run["trace"])
        experts = tuple(json.loads(metadata["mole.trace"])["experts"])
        glob = tensors["global_cond"].numpy()                      # (steps, images, experts)
        curves.setdefault(run["kind"], []).append(glob.transpose(1, 0, 2))
        if run["kind"] == "scenes":
            maps = tensors["local_cond"].numpy().transpose(1, 0, 2, 3, 4)   # (images, steps, experts, h, w)
            for image, verdict, m in zip(run["images"], judge.judge_files(run["images"]), maps):
                if verdict.found("face") and verdict.found("hand"):
                    local.append(m)
                    samples.append(Sample(image, run["caption"], verdict.masks))
    out = {"experts": list(experts),
           "global": {kind: np.concatenate(c).mean(0).tolist() for kind, c in curves.items()},   # (steps, experts)
           "pictures": {kind: int(sum(len(c) for c in cs)) for kind, cs in curves.items()},
           "scenes_with_face_and_hand": len(samples)}
    if samples:
        maps = np.stack(local)
        steps = bands(maps.shape[1])
        banded = np.stack([maps[:, s].mean(1) for _, s in steps], axis=1)
        out["local"] = local_gate_report(banded, samples, experts, tuple(name for name, _ in steps))
    return out


def plot(found: dict, path: Path) -> Path:
    """Mean global gate per expert per step, one panel per kind of picture (the paper's Fig. 7 a-c)."""
    from ...mole_ops.plots import line_plot, save_png

    panels = []
    for kind, curve in found["global"].items():
        curve = np.asarray(curve)
        panels.append(line_plot({e: curve[:, i] for i, e in enumerate(found["experts"])},
                                np.arange(1, len(curve) + 1), title=f"{kind} ({found['pictures'][kind]} generated)",
                                xlabel="sampling step", ylabel="mean global gate", ylim=(0.0, 1.0), size=(400, 300)))
    save_png(np.concatenate(panels, axis=1), str(path))
    return path


def run(results: Path, base_dir: Path, recipe, seed: int) -> dict:
    """Measured once into results/generated_gates.json (+ .png); a second call reads it."""
    cache = results / "generated_gates.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from ..harness.comfy_server import ComfyServer

    with ComfyServer(base_dir) as server:
        runs = generate(server, recipe, seed)
    found = measure(runs)
    plot(found, results / "generated_gates.png")
    cache.write_text(json.dumps(found, indent=1))
    return found
