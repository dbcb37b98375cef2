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
from ..mole_ops.trace import COND, UNCOND
from ..mole_ops.viz import gate_map_grid, overlay
from .apply import Trace

KINDS = {"cond": COND, "uncond": UNCOND}


def _local_maps(trace, kind: str):
    if trace is None:
        raise MoLEError("no gate trace: turn on record_trace in Apply MoLE")
    if not trace.local:
        raise MoLEError("the gate trace is empty: the sampler did not run with this Apply MoLE (a cached result?) "
                        "or the gate mode has no local gate; re-queue after changing the seed or the mode")
    return trace.local_maps(KINDS[kind])


def parse_steps(text: str, available: int) -> list[int]:
    if text.strip().lower() in ("", "all"):
        return list(range(available))
    try:
        steps = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError as e:
        raise MoLEError(f"steps {text!r}: give 'all' or step numbers like '0,5,10'") from e
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
                    io.String.Input("steps", default="all", tooltip="Steps to show in the grid: 'all' or '0,5,10'."),
                    io.Int.Input("image_index", default=0, min=0, max=4095, tooltip="Which image of the batch."),
                    io.Combo.Input("rows", options=list(KINDS), default="cond",
                                   tooltip="Positive (cond) or negative (uncond) batch rows.")],
            outputs=[io.Image.Output(display_name="grid"), io.Image.Output(display_name="overlay")])

    @classmethod
    def execute(cls, trace, images, steps, image_index, rows) -> io.NodeOutput:
        maps = _local_maps(trace, rows)                                   # (S, B, N, H, W)
        if image_index >= maps.shape[1]:
            raise MoLEError(f"image_index {image_index}: the trace holds {maps.shape[1]} images")
        chosen = maps[parse_steps(steps, maps.shape[0]), image_index]     # (S', N, H, W)
        image = images[min(image_index, images.shape[0] - 1):][:1]
        mean = maps[:, image_index].mean(dim=0, keepdim=True)            # (1, N, H, W) over all steps
        return io.NodeOutput(gate_map_grid(chosen), overlay(image, mean))


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
        return io.NodeOutput(ui={"text": [os.path.basename(base) + ".safetensors"]})
