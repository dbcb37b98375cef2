"""Gate maps from a recorded trace: a step grid and an overlay on the decoded images; saving the raw trace.

These nodes take the decoded images as an input so that ComfyUI runs them after the sampler.
"""
from __future__ import annotations

import json
import os

import folder_paths
import torch
from comfy_api.latest import io

from ..mole_ops import safetensors_io
from ..mole_ops.errors import MoLEError
from ..mole_ops.plots import gate_curves
from ..mole_ops.trace import COND, UNCOND
from ..mole_ops.viz import gate_map_grid, labelled_grid, overlay
from .report import node_ui
from .types import Trace

KINDS = {"cond": COND, "uncond": UNCOND}


def _check_rows(store: dict, kind: str) -> None:
    """The trace holds rows of `kind`; at CFG 1 the sampler runs no negative (uncond) rows at all."""
    if not any(k == KINDS[kind] for _, k in store):
        raise MoLEError(f"the gate trace holds no {kind} rows: at CFG 1 the sampler skips the negative prompt, so "
                        "there are only cond rows; set rows to cond (or CFG above 1)")


def _local_maps(trace, kind: str):
    if trace is None:
        raise MoLEError("no gate trace: turn on record_trace in Apply MoLE")
    if not trace.local:
        raise MoLEError("the gate trace is empty: the sampler did not run with this Apply MoLE (a cached result? "
                        "re-queue after changing the seed), or the gate mode has no local gate (mode none or global)")
    _check_rows(trace.local, kind)
    return trace.local_maps(KINDS[kind])


def parse_steps(text: str, available: int, auto: int = 6) -> list[int]:
    """'all', 'auto' (at most `auto` steps, evenly spaced, first and last included) or '0,5,10'."""
    text = text.strip().lower()
    if text in ("", "all") or (text == "auto" and available <= auto):
        return list(range(available))
    if text == "auto":
        return sorted({round(i * (available - 1) / (auto - 1)) for i in range(auto)})
    try:
        steps = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError as e:
        raise MoLEError(f"steps {text!r}: give 'all', 'auto' or step numbers like '0,5,10'") from e
    bad = [s for s in steps if not 0 <= s < available]
    if bad:
        raise MoLEError(f"steps {bad} are outside 0..{available - 1} (the trace has {available} steps)")
    return steps


class GateMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_GateMaps", display_name="MoLE Gate Maps", category="MoLE",
            description="Where each expert acted: local-gate maps per step (grid) and over the image (overlay).",
            inputs=[Trace.Input("trace", tooltip="The trace from Apply MoLE (record_trace on)."),
                    io.Image.Input("images", tooltip="The decoded images of that sampler run (orders this node "
                                   "after the sampler; used for the overlay)."),
                    io.String.Input("steps", default="auto", tooltip="Steps to show in the grid: 'auto' (six steps "
                                    "from first to last), 'all', or step numbers like '0,5,10'."),
                    io.Int.Input("image_index", default=0, min=0, max=4095, tooltip="Which image of the batch."),
                    io.Combo.Input("rows", options=list(KINDS), default="cond",
                                   tooltip="Positive (cond) or negative (uncond) batch rows.")],
            outputs=[io.Image.Output(display_name="grid"), io.Image.Output(display_name="overlay")])

    @classmethod
    def execute(cls, trace, images, steps, image_index, rows) -> io.NodeOutput:
        maps = _local_maps(trace, rows)                                   # (S, B, N, H, W)
        if image_index >= maps.shape[1]:
            raise MoLEError(f"image_index {image_index}: the trace holds {maps.shape[1]} images")
        chosen_steps = parse_steps(steps, maps.shape[0])
        chosen = maps[chosen_steps, image_index]                          # (S', N, H, W)
        image = images[min(image_index, images.shape[0] - 1):][:1]
        mean = maps[:, image_index].mean(dim=0, keepdim=True)            # (1, N, H, W) over all steps
        numbers = [s for s in trace.steps() if (s, KINDS[rows]) in trace.local]
        numbers = [numbers[i] for i in chosen_steps]
        return io.NodeOutput(gate_map_grid(chosen, experts=trace.experts, steps=numbers),
                             overlay(image, mean, experts=trace.experts))


class GateCurves(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_GateCurves", display_name="MoLE Gate Curves", category="MoLE",
            description="Mean global gate of each expert per sampling step, as a plot (the paper's Fig. 7 a-c).",
            inputs=[Trace.Input("trace", tooltip="The trace from Apply MoLE (record_trace on)."),
                    io.Image.Input("images", tooltip="The decoded images of that sampler run (orders this node "
                                   "after the sampler)."),
                    io.Int.Input("image_index", default=-1, min=-1, max=4095,
                                 tooltip="Which image of the batch; -1 averages over the batch."),
                    io.Combo.Input("rows", options=list(KINDS), default="cond",
                                   tooltip="Positive (cond) or negative (uncond) batch rows.")],
            outputs=[io.Image.Output(display_name="plot")])

    @classmethod
    def execute(cls, trace, images, image_index, rows) -> io.NodeOutput:
        if trace is None:
            raise MoLEError("no gate trace: turn on record_trace in Apply MoLE")
        if not trace.glob:
            raise MoLEError("the gate trace holds no global gates: the sampler did not run with this Apply MoLE "
                            "(a cached result?) or the gate mode has no global gate")
        _check_rows(trace.glob, rows)
        curve = trace.global_curve(KINDS[rows])                           # (S, B, N)
        if image_index >= curve.shape[1]:
            raise MoLEError(f"image_index {image_index}: the trace holds {curve.shape[1]} images")
        which = "batch mean" if image_index < 0 else f"image {image_index}"
        curve = curve.mean(dim=1) if image_index < 0 else curve[:, image_index]
        steps = [s for s in trace.steps() if (s, KINDS[rows]) in trace.glob]
        return io.NodeOutput(gate_curves(curve, trace.experts, steps, f"global gates ({rows}, {which})"))


class SaveTrace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_SaveTrace", display_name="Save MoLE Gate Trace", category="MoLE", is_output_node=True,
            description="Write the per-step gate data to the output folder (safetensors + JSON) for analysis.",
            inputs=[Trace.Input("trace", tooltip="The trace from Apply MoLE (record_trace on)."),
                    io.Image.Input("images", tooltip="The decoded images of that run (orders this node after it)."),
                    io.String.Input("filename_prefix", default="mole_trace", tooltip="Output file prefix.")],
            outputs=[])

    @classmethod
    def execute(cls, trace, images, filename_prefix) -> io.NodeOutput:
        _local_maps(trace, "cond")
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory())
        base = os.path.join(folder, f"{name}_{counter:05}_")
        tensors = {}
        for kind, k in KINDS.items():
            if any(key[1] == k for key in trace.local):
                tensors[f"local_{kind}"] = trace.local_maps(k).contiguous()
            if any(key[1] == k for key in trace.glob):
                tensors[f"global_{kind}"] = trace.global_curve(k).contiguous()
        info = {"experts": list(trace.experts), "steps": trace.steps(), "latent_hw": list(trace.latent_hw),
                "layout": {"local_*": "steps x images x experts x H x W", "global_*": "steps x images x experts"}}
        safetensors_io.write(base + ".safetensors", {k: v.to(torch.float32) for k, v in tensors.items()},
                             {"mole.trace": json.dumps(info)})
        with open(base + ".json", "w") as f:
            json.dump({**info, **{k: v.tolist() for k, v in tensors.items() if k.startswith("global")}}, f)
        return io.NodeOutput(ui=node_ui([os.path.basename(base) + ".safetensors"], [])[1])


class ImageGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        images = [io.Image.Input(f"image_{i}", optional=i > 1, tooltip=f"Image {i} of the grid (a batch adds all "
                                 "its images under one label).") for i in range(1, 9)]
        return io.Schema(
            node_id="MoLE_ImageGrid", display_name="MoLE Labelled Image Grid", category="MoLE",
            description="Up to eight images (or batches) in one grid, each under its label: for ablations.",
            inputs=[io.String.Input("labels", default="base, face, hand, local, global, both",
                                    tooltip="Comma-separated labels, one per connected image input, in order."),
                    io.Int.Input("columns", default=3, min=1, max=16, tooltip="Images per row."),
                    *images],
            outputs=[io.Image.Output(display_name="grid")])

    @classmethod
    def execute(cls, labels, columns, image_1, **more) -> io.NodeOutput:
        images = [image_1] + [more[f"image_{i}"] for i in range(2, 9) if more.get(f"image_{i}") is not None]
        names = [s.strip() for s in labels.split(",")]
        names += [f"image {i}" for i in range(len(names) + 1, len(images) + 1)]
        return io.NodeOutput(labelled_grid(images, names[:len(images)], columns))
