"""Loader nodes: experts, gates, packs -> MOLE_EXPERTS / MOLE_GATES."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..mole_ops import card as card_format
from ..mole_ops import expert_file, pack_file
from ..mole_ops import gate_file as gate_format
from ..mole_ops.errors import MismatchError
from . import inputs
from .files import NONE, expert_files, full_path, mole_files
from .report import caught_warnings, node_ui
from .types import Experts, Gates, Settings

SLOTS = (("face", True), ("hand", False), ("", False))     # default role per slot; the third is free
log = logging.getLogger("mole")


class LoadExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = []
        for i, (role, required) in enumerate(SLOTS, start=1):
            options = expert_files() if required else [NONE] + expert_files()
            inputs += [
                io.Combo.Input(f"expert_{i}", options=options, tooltip=f"Expert {i}: a kohya LoRA file "
                               "(models/mole or models/loras)." + ("" if required else " (none) leaves the slot empty.")),
                io.String.Input(f"role_{i}", default=role, tooltip=f"Name of expert {i} (face, hand, or any name, "
                                "e.g. feet); gate files pair experts by these names, in this order. Ignored when "
                                "the slot is (none)."),
            ]
        inputs.append(Experts.Input("experts", optional=True, tooltip="Experts to extend (these come first)."))
        return io.Schema(node_id="MoLE_LoadExperts", display_name="Load MoLE Experts", category="MoLE",
                         description="Load one to three LoRA experts, each under a role name, in column order.",
                         inputs=inputs, outputs=[Experts.Output(display_name="experts")])

    @classmethod
    def execute(cls, expert_1, role_1, expert_2=NONE, role_2="hand", expert_3=NONE, role_3="",
                experts=None) -> io.NodeOutput:
        out = list(inputs.experts(experts)) if experts is not None else []
        for slot, (name, role) in enumerate(((expert_1, role_1), (expert_2, role_2), (expert_3, role_3)), start=1):
            if name is None or name == NONE or name == "":
                continue
            inputs.text(f"expert_{slot}", name)
            inputs.text(f"role_{slot}", role)
            if not role.strip():
                raise MismatchError(f"expert_{slot} ({name}) has no role name: type one into role_{slot} (face, "
                                    "hand, feet, ...)")
            out.append(expert_file.load(full_path(name), role.strip()))
        names = [e.name for e in out]
        if len(set(names)) != len(names):
            raise MismatchError(f"expert role names must be unique, got {names}")
        return io.NodeOutput(tuple(out))


def check_gate_order(gates, experts) -> None:
    names = tuple(e.name for e in experts)
    if gates.experts != names:
        raise MismatchError(f"{gates.path}: gate columns are {list(gates.experts)} but the experts are "
                            f"{list(names)}; name and order the experts as the gates expect")


class LoadGates(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_LoadGates", display_name="Load MoLE Gates", category="MoLE",
            description="Load a gate file (ours or the authors') for the given experts.",
            inputs=[Experts.Input("experts", tooltip="The experts these gates were trained with."),
                    io.Combo.Input("gate_file", options=mole_files(), tooltip="Gate file in models/mole.")],
            outputs=[Gates.Output(display_name="gates")])

    @classmethod
    def execute(cls, experts, gate_file) -> io.NodeOutput:
        experts = inputs.experts(experts)
        gates = gate_format.load(full_path(gate_file))
        check_gate_order(gates, experts)
        return io.NodeOutput(gates)


class LoadPack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_LoadPack", display_name="Load MoLE Pack", category="MoLE",
            description="Load a single-file MoLE pack (experts + gates), with its card: what it is, the base it "
                        "needs and the settings its author recommends.",
            inputs=[io.Combo.Input("pack", options=mole_files(), tooltip="MoLE pack file in models/mole.")],
            outputs=[Experts.Output(display_name="experts"), Gates.Output(display_name="gates"),
                     Settings.Output(display_name="recommended", tooltip="The pack's recommended Apply MoLE "
                                     "settings (mode, strengths, step range): connect it to Apply MoLE's "
                                     "recommended input to use them; nothing when the pack has none."),
                     io.String.Output(display_name="info", tooltip="The pack's card: title, author, licence, base "
                                      "model and recommended settings (sampler steps and CFG included); also "
                                      "shown on the node.")])

    @classmethod
    def execute(cls, pack) -> io.NodeOutput:
        inputs.text("pack", pack)
        with caught_warnings() as warnings:
            experts, gates, metadata = pack_file.load(full_path(pack), with_metadata=True)
            card, problems = pack_file.load_card(metadata)
            for problem in problems:
                log.warning("MoLE: %s: card field ignored: %s", pack, problem)
        lines = [f"pack {pack}: experts {', '.join(e.name for e in experts)}"]
        lines += card_format.summary(card) if card is not None else ["no card (no title, base or recommended "
                                                                     "settings in this pack)"]
        text, ui = node_ui(lines, warnings)
        return io.NodeOutput(tuple(experts), gates, card.recommended if card is not None else None, text, ui=ui)


class LoadSet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_LoadSet", display_name="Load MoLE Three-File Set", category="MoLE",
            description="Load a MoLE release of separate files, such as the authors' MoLE-SDXL set: a face LoRA, a "
                        "hand LoRA and their gate file.",
            inputs=[io.Combo.Input("expert_1", options=expert_files(), tooltip="First expert LoRA (the face "
                                   "LoRA of the authors' set)."),
                    io.String.Input("role_1", default="face", tooltip="Name of the first expert."),
                    io.Combo.Input("expert_2", options=expert_files(), tooltip="Second expert LoRA (the hand "
                                   "LoRA of the authors' set)."),
                    io.String.Input("role_2", default="hand", tooltip="Name of the second expert."),
                    io.Combo.Input("gate_file", options=mole_files(), tooltip="The gate file in models/mole.")],
            outputs=[Experts.Output(display_name="experts"), Gates.Output(display_name="gates")])

    @classmethod
    def execute(cls, expert_1, role_1, expert_2, role_2, gate_file) -> io.NodeOutput:
        inputs.text("role_1", role_1)
        inputs.text("role_2", role_2)
        if role_1.strip() == role_2.strip():
            raise MismatchError(f"expert role names must differ, both are {role_1!r}")
        experts = (expert_file.load(full_path(expert_1), role_1.strip()),
                   expert_file.load(full_path(expert_2), role_2.strip()))
        gates = gate_format.load(full_path(gate_file))
        check_gate_order(gates, experts)
        return io.NodeOutput(experts, gates)
