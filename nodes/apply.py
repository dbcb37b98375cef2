"""Apply MoLE and Expert at fixed scale: MODEL -> MODEL with the gated experts attached (on a clone)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..mole_ops import expert_file
from ..mole_ops.errors import MismatchError
from ..mole_ops.fingerprint import check_base
from ..mole_ops.layout import UNetLayout
from ..mole_ops.mixture import check_gates, describe, role_warnings, shared, swapped
from ..mole_ops.ops import MODES, GateSettings
from ..mole_ops.trace import GateTrace
from . import inputs
from .files import expert_files, full_path
from .patch import MoLEPatch, apply_mole
from .report import caught_warnings, node_ui
from .types import Experts, Gates, Settings, Trace

log = logging.getLogger("mole")


def model_layout(model) -> UNetLayout:
    return UNetLayout.from_unet_config(model.model.model_config.unet_config, name=type(model.model.model_config).__name__)


SLOTS = ("strength_1", "strength_2", "strength_3")


def warnings_for(model, experts, gates=None, roles: bool = True) -> list[str]:
    """What may be wrong although it runs, checked on every run (a cached MoLE repeats nothing): files trained on
    another base, gates trained with other files, files under swapped roles (with `roles`). Logged (and so shown
    on the node: report.caught_warnings) and returned."""
    found = check_base(model.model.diffusion_model, experts, gates)
    if gates is not None:
        # a file under a swapped role gets one warning that says so (role_warnings), not also "not the file the
        # gates were trained with" (check_gates words that one "expert '<name>' (<path>) ...")
        flagged = swapped(list(experts), gates) if roles else {}
        found += [w for w in check_gates(gates, list(experts), model_layout(model)).warnings
                  if not any(w.startswith(f"expert {name!r} (") for name in flagged)]
    found += role_warnings(list(experts), gates) if roles else []
    for warning in found:
        log.warning("MoLE: %s", warning)
    return found


class ApplyMoLE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        strengths = [io.Float.Input(slot, display_name=f"strength {i} ({which} expert)", default=1.0, min=0.0,
                                    max=4.0, step=0.05,
                                    tooltip=f"Multiplier of the {which} expert of the experts input (expert_{i} of "
                                    f"Load MoLE Experts: {role} in the shipped workflows); 0 turns it off. The "
                                    "info output lists which file each strength scales.")
                     for i, (slot, which, role) in enumerate(zip(SLOTS, ("first", "second", "third"),
                                                                 ("face", "hand", "unused")), start=1)]
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
                                     "(for the gate-map nodes); off costs nothing."),
                    Settings.Input("recommended", optional=True, tooltip="A pack's recommended settings (Load MoLE "
                                   "Pack): when connected they replace mode, the strengths of the roles they name "
                                   "and the step range set here.")],
            outputs=[io.Model.Output(display_name="model"), Trace.Output(display_name="trace"),
                     io.String.Output(display_name="info", tooltip="What was attached (experts, files, ranks, "
                                      "strengths, layers, gates) and any warning; also shown on the node itself.")])

    @classmethod
    def execute(cls, model, experts, mode, strength_1, strength_2, strength_3, start_percent, end_percent,
                record_trace, gates=None, recommended=None) -> io.NodeOutput:
        inputs.finite(strength_1=strength_1, strength_2=strength_2, strength_3=strength_3,
                      start_percent=start_percent, end_percent=end_percent)
        experts, gates = inputs.experts(experts), inputs.gates(gates)
        recommended = inputs.recommended(recommended)
        if recommended is not None:        # the pack's settings win over the widgets (see the strengths below)
            mode, start_percent, end_percent = recommended.mode, recommended.start_percent, recommended.end_percent
        record_trace = inputs.flag("record_trace", record_trace)
        if mode not in MODES:
            raise MismatchError(f"input mode is {mode!r}: one of {', '.join(MODES)}")
        if gates is None and mode != "none":
            raise MismatchError(f"gate mode {mode!r} needs gates: connect Load MoLE Gates, or use mode 'none'")
        if start_percent > end_percent:
            raise MismatchError(f"start_percent {start_percent} is after end_percent {end_percent}: MoLE would "
                                "never act; set start_percent <= end_percent")
        if len(experts) > len(SLOTS):
            log.info("MoLE: experts after the third run at strength 1 (Apply MoLE has three strength inputs)")
        with caught_warnings() as warnings:
            warnings_for(model, experts, gates)
            mole = shared(list(experts), gates, model_layout(model))
        strengths = dict(zip(mole.order, (strength_1, strength_2, strength_3)))
        if recommended is not None:
            strengths = {name: recommended.strengths.get(name, strengths.get(name, 1.0)) for name in mole.order}
        settings = GateSettings(mode, strengths)
        trace = GateTrace(mole.order) if record_trace else None
        patched = apply_mole(model, MoLEPatch(mole, settings, start_percent, end_percent, trace))
        lines = describe(mole, list(experts), gates, settings, start_percent, end_percent, SLOTS)
        if recommended is not None:
            lines.append("settings: the pack's recommended ones (its recommended input), not this node's widgets")
        text, ui = node_ui(lines, warnings)
        return io.NodeOutput(patched, trace, text, ui=ui)


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
        inputs.finite(strength=strength)
        inputs.text("expert", expert)
        with caught_warnings() as warnings:
            loaded = expert_file.load(full_path(expert), "expert")
            warnings_for(model, [loaded], roles=False)
            mole = shared([loaded], None, model_layout(model))
        settings = GateSettings("none", {"expert": strength})
        _, ui = node_ui(describe(mole, [loaded], None, settings, 0.0, 1.0), warnings)
        return io.NodeOutput(apply_mole(model, MoLEPatch(mole, settings)), ui=ui)
