"""Loader nodes: experts, gates, packs -> MOLE_EXPERTS / MOLE_GATES."""
from __future__ import annotations

import logging
from pathlib import Path

from comfy_api.latest import io

from ..mole_ops import card as card_format
from ..mole_ops import expert_file, pack_file
from ..mole_ops import rank as rank_reduction
from ..mole_ops import gate_file as gate_format
from ..mole_ops.errors import MismatchError
from . import inputs
from .files import NONE, expert_files, full_path, mole_files
from .report import caught_warnings, node_ui
from .types import Experts, Gates, Settings

SLOTS = (("face", True), ("hand", False), ("", False))     # default role per slot; the third is free
log = logging.getLogger("mole")


def rank_input() -> io.Combo.Input:
    return io.Combo.Input("rank", options=list(rank_reduction.NODE_OPTIONS), default="full", optional=True,
                          tooltip="Reduce the experts to the rank they use, for speed and memory: 'full' keeps "
                          "them as trained; '99% energy' keeps in each layer the fewest singular values that hold "
                          "99% of its delta's energy (each layer's delta then differs by at most 10%, sqrt(1 - 0.99)); a "
                          "number keeps that rank in every layer. Done once per "
                          "file and setting (an SVD of each layer); the gates stay valid. 'info' says the ranks "
                          "kept and the error of each expert.")


def reduced(experts, setting, what: str = "rank") -> tuple[tuple[expert_file.ExpertFile, ...], list[str]]:
    """The experts at the node's rank setting, and the lines its info shows (ranks kept, delta error)."""
    rule = rank_reduction.RankRule.parse(inputs.choice(what, setting, rank_reduction.NODE_OPTIONS))
    if rule.full:
        return tuple(experts), []
    import comfy.utils

    out, lines = [], []
    total = sum(len(e.layers) for e in experts)
    bar = comfy.utils.ProgressBar(total)
    done = 0
    for e in experts:
        r = rank_reduction.reduce(e, rule, lambda i, n, start=done: bar.update_absolute(start + i, total))
        done += len(e.layers)
        out.append(r)
        lines.append(r.reduction.stats.summary(e.name) if r.reduction is not None else f"{e.name}: unchanged")
    return tuple(out), lines


def expert_lines(experts) -> list[str]:
    from ..mole_ops.mixture import rank_text

    return [f"{e.name}: {Path(e.path).name if e.path else '(in memory)'} ({rank_text(e)}, {len(e.layers)} layers)"
            for e in experts]


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
        inputs.append(rank_input())
        return io.Schema(node_id="MoLE_LoadExperts", display_name="Load MoLE Experts", category="MoLE",
                         description="Load one to three LoRA experts, each under a role name, in column order; "
                                     "optionally reduced to the rank they use.",
                         inputs=inputs, outputs=[Experts.Output(display_name="experts"), info_output()])

    @classmethod
    def execute(cls, expert_1, role_1, expert_2=NONE, role_2="hand", expert_3=NONE, role_3="",
                experts=None, rank="full") -> io.NodeOutput:
        out = list(inputs.experts(experts)) if experts is not None else []
        extended = len(out)
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
        with caught_warnings() as warnings:
            loaded, lines = reduced(out[extended:], rank)
        out = out[:extended] + list(loaded)
        text, ui = node_ui(expert_lines(out) + lines, warnings)
        return io.NodeOutput(tuple(out), text, ui=ui)


def info_output() -> io.String.Output:
    return io.String.Output(display_name="info", tooltip="The experts loaded: files, ranks and, when reduced, the "
                            "ranks kept and the error of each expert's delta (max and mean over layers); also "
                            "shown on the node.")


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
            inputs=[io.Combo.Input("pack", options=mole_files(), tooltip="MoLE pack file in models/mole."),
                    rank_input()],
            outputs=[Experts.Output(display_name="experts"), Gates.Output(display_name="gates"),
                     Settings.Output(display_name="recommended", tooltip="The pack's recommended Apply MoLE "
                                     "settings (mode, strengths, step range): connect it to Apply MoLE's "
                                     "recommended input to use them; nothing when the pack has none."),
                     io.String.Output(display_name="info", tooltip="The pack's card: title, author, licence, base "
                                      "model and recommended settings (sampler steps and CFG included); also "
                                      "shown on the node.")])

    @classmethod
    def execute(cls, pack, rank="full") -> io.NodeOutput:
        inputs.text("pack", pack)
        with caught_warnings() as warnings:
            experts, gates, metadata = pack_file.load(full_path(pack), with_metadata=True)
            card, problems = pack_file.load_card(metadata)
            for problem in problems:
                log.warning("MoLE: %s: card field ignored: %s", pack, problem)
            experts, rank_lines = reduced(experts, rank)
        lines = [f"pack {pack}: experts {', '.join(e.name for e in experts)}"]
        lines += card_format.summary(card) if card is not None else ["no card (no title, base or recommended "
                                                                     "settings in this pack)"]
        lines += rank_lines
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
                    io.Combo.Input("gate_file", options=mole_files(), tooltip="The gate file in models/mole."),
                    rank_input()],
            outputs=[Experts.Output(display_name="experts"), Gates.Output(display_name="gates"), info_output()])

    @classmethod
    def execute(cls, expert_1, role_1, expert_2, role_2, gate_file, rank="full") -> io.NodeOutput:
        inputs.text("role_1", role_1)
        inputs.text("role_2", role_2)
        if role_1.strip() == role_2.strip():
            raise MismatchError(f"expert role names must differ, both are {role_1!r}")
        experts = (expert_file.load(full_path(expert_1), role_1.strip()),
                   expert_file.load(full_path(expert_2), role_2.strip()))
        gates = gate_format.load(full_path(gate_file))
        check_gate_order(gates, experts)
        with caught_warnings() as warnings:
            experts, lines = reduced(experts, rank)
        text, ui = node_ui(expert_lines(experts) + lines + [f"gates: {gates.variant} variant from {gate_file}"],
                           warnings)
        return io.NodeOutput(experts, gates, text, ui=ui)
