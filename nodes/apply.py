"""Apply MoLE and Expert at fixed scale: MODEL -> MODEL with the gated experts attached (on a clone)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..mole_ops import expert_file
from ..mole_ops.errors import MismatchError
from ..mole_ops.fingerprint import check_base
from ..mole_ops.layout import UNetLayout
from ..mole_ops.mixture import build
from ..mole_ops.ops import MODES, GateSettings
from ..mole_ops.trace import GateTrace
from .files import expert_files, full_path
from .patch import MoLEPatch, apply_mole
from .types import Experts, Gates, Trace

log = logging.getLogger("mole")


def model_layout(model) -> UNetLayout:
    return UNetLayout.from_unet_config(model.model.model_config.unet_config, name=type(model.model.model_config).__name__)


def warn_other_base(model, experts, gates=None) -> None:
    for warning in check_base(model.model.diffusion_model, experts, gates):
        log.warning("MoLE: %s", warning)


class ApplyMoLE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        strengths = [io.Float.Input(f"strength_{i}", default=1.0, min=0.0, max=4.0, step=0.05,
                                    tooltip=f"Multiplier of expert {i} (column order of the experts); 0 turns it off.")
                     for i in (1, 2, 3)]
        return io.Schema(
            node_id="MoLE_Apply", display_name="Apply MoLE", category="MoLE",
            description="Attach the experts and their learned gates to the model (a clone; the input is unchanged).",
            inputs=[io.Model.Input("model", tooltip="The stage-1 model (any SD1.5 or SDXL MODEL)."),
                    Experts.Input("experts", tooltip="Experts from Load MoLE Experts or Load MoLE Pack."),
                    Gates.Input("gates", optional=True, tooltip="Gates for these experts; without gates only "
                                "mode 'none' (experts at fixed scale) is possible."),
                    io.Combo.Input("mode", options=list(MODES), default="both", tooltip="Which gates to use: both "
                                   "(paper), local (per token) only, global (per sample) only, none (fixed scale)."),
                    *strengths,
                    io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="Fraction of the sampling schedule where MoLE starts acting."),
                    io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="Fraction of the sampling schedule where MoLE stops acting."),
                    io.Boolean.Input("record_trace", default=False, tooltip="Record the gate maps while sampling "
                                     "(for the gate-map nodes); off costs nothing.")],
            outputs=[io.Model.Output(display_name="model"), Trace.Output(display_name="trace")])

    @classmethod
    def execute(cls, model, experts, mode, strength_1, strength_2, strength_3, start_percent, end_percent,
                record_trace, gates=None) -> io.NodeOutput:
        if gates is None and mode != "none":
            raise MismatchError(f"gate mode {mode!r} needs gates: connect Load MoLE Gates, or use mode 'none'")
        warn_other_base(model, experts, gates)
        mole = build(list(experts), gates, model_layout(model))
        strengths = dict(zip(mole.order, (strength_1, strength_2, strength_3)))
        trace = GateTrace(mole.order) if record_trace else None
        patch = MoLEPatch(mole, GateSettings(mode, strengths), start_percent, end_percent, trace)
        return io.NodeOutput(apply_mole(model, patch), trace)


class ExpertFixedScale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_ExpertFixedScale", display_name="MoLE Expert at Fixed Scale", category="MoLE",
            description="One expert at one strength, no gate: the paper's low-rank refinement (Fig. 1).",
            inputs=[io.Model.Input("model", tooltip="The model to refine."),
                    io.Combo.Input("expert", options=expert_files(), tooltip="A kohya LoRA expert file."),
                    io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                                   tooltip="Multiplier on top of the file's own scale (alpha/rank).")],
            outputs=[io.Model.Output(display_name="model")])

    @classmethod
    def execute(cls, model, expert, strength) -> io.NodeOutput:
        loaded = expert_file.load(full_path(expert), "expert")
        warn_other_base(model, [loaded])
        mole = build([loaded], None, model_layout(model))
        return io.NodeOutput(apply_mole(model, MoLEPatch(mole, GateSettings("none", {"expert": strength}))))
