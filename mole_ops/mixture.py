"""A whole model's MoLE: experts and gates paired by layer key and expert name, validated, as modules.

Experts and gates are paired by name (never by list position or a substring of a path) and by layer key
(through the UNet layout's kohya name map); every mismatch is reported before anything is built.
"""
from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import MismatchError
from .expert_file import ExpertFile
from .gate_file import GateFile, GateWeights
from .layout import UNetLayout, detect_layout
from .ops import VARIANTS, LoRA, MoLELayer

log = logging.getLogger("mole")


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def raise_if_errors(self, what: str) -> None:
        if self.errors:
            raise MismatchError(f"{what}: " + "; ".join(self.errors))


def resolve_experts(experts: list[ExpertFile], layout: UNetLayout | None) -> tuple[UNetLayout, dict[str, str]]:
    """(layout, {layer key: kohya name}) for experts that all cover the same layers."""
    if not experts:
        raise MismatchError("no experts given")
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise MismatchError(f"expert names must be unique, got {names}")
    layout = layout or detect_layout(experts[0].layers, f"expert {experts[0].name!r} ({experts[0].path})")
    keys = None
    for e in experts:
        resolved = layout.resolve(list(e.layers), f"expert {e.name!r} ({e.path})")
        these = {v: k for k, v in resolved.items()}
        if keys is None:
            keys = these
        elif set(these) != set(keys):
            diff = sorted(set(these) ^ set(keys))
            raise MismatchError(f"experts {experts[0].name!r} and {e.name!r} cover different layers "
                                f"({len(diff)} differ, first: {diff[0]})")
    return layout, keys


def check_gates(gates: GateFile, experts: list[ExpertFile], layout: UNetLayout | None = None) -> Report:
    """Do these gates belong to these experts? Names and order, layers, shapes, ranks, hashes."""
    report = Report()
    names = tuple(e.name for e in experts)
    if gates.experts != names:
        report.errors.append(f"gate columns are {list(gates.experts)} but the experts are {list(names)} "
                             "(same names in the same order expected)")
        return report
    layout, expert_keys = resolve_experts(experts, layout)
    gate_keys = {v: k for k, v in layout.resolve(list(gates.layers), f"gate file {gates.path}").items()}
    missing, extra = sorted(set(expert_keys) - set(gate_keys)), sorted(set(gate_keys) - set(expert_keys))
    if missing:
        report.errors.append(f"{len(missing)} expert layers have no gates (first: {expert_keys[missing[0]]})")
    if extra:
        report.errors.append(f"{len(extra)} gated layers have no expert (first: {gate_keys[extra[0]]})")
    for key in sorted(set(expert_keys) & set(gate_keys)):
        g = gates.layers[gate_keys[key]]
        w = experts[0].layers[expert_keys[key]]
        d_in, d_out = w.down.shape[1], w.up.shape[0]
        want_global = d_out if gates.variant == "official" else d_in
        if g.local_w.shape[1] != d_in or g.global_w.shape[1] != want_global:
            report.errors.append(f"layer {gate_keys[key]}: gates expect d_in {g.local_w.shape[1]} / global "
                                 f"{g.global_w.shape[1]}, experts have d_in {d_in} / {want_global}")
            break
    for e in experts:
        info = gates.expert_info.get(e.name, {})
        # a reduced expert (rank.py) is checked as the file it was reduced from: the gates stay valid for it
        ranks, alphas = ({int(e.source["rank"])}, {float(e.source["alpha"])}) if e.source else (e.ranks, e.alphas)
        reduced = f" (reduced from rank {e.source['rank']})" if e.source else ""
        if "rank" in info and {int(info["rank"])} != ranks:
            report.errors.append(f"gates were trained with expert {e.name!r} of rank {info['rank']}, "
                                 f"this one has rank {sorted(ranks)}{reduced}")
        if "alpha" in info and {float(info["alpha"])} != alphas:
            report.errors.append(f"gates were trained with expert {e.name!r} of alpha {info['alpha']}, "
                                 f"this one has alpha {sorted(alphas)}{reduced}")
        if info.get("sha256") and e.origin_sha256 and info["sha256"] != e.origin_sha256:
            report.warnings.append(f"expert {e.name!r} ({e.path}) is not the file the gates were trained with "
                                   "(sha256 differs; fine after a dtype conversion, wrong if it is another expert)")
    return report


AUTHORS_ALPHAS = {"face": 64.0, "hand": 128.0}     # the released MoLE experts (rank 256), SPEC.md section 3


def trained_role(expert: ExpertFile) -> str | None:
    """The role our trainer wrote into the file (ss_network_args: {"mole_expert": ...}), or None."""
    try:
        args = json.loads(expert.metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        return None
    return args.get("mole_expert") if isinstance(args, dict) else None


def swapped(experts: list[ExpertFile], gates: GateFile | None = None) -> dict[str, list[str]]:
    """{expert name: why its file looks like another role's}: the role our trainer wrote into the file, and the
    role the gates were trained with this file (by hash) under."""
    hashes = {} if gates is None else {info.get("sha256"): name for name, info in gates.expert_info.items()
                                       if info.get("sha256")}
    found = {}
    for e in experts:
        reasons = []
        role = trained_role(e)
        if role and role != e.name:
            reasons.append(f"it was trained as the {role!r} expert")
        other = hashes.get(e.origin_sha256) if e.origin_sha256 else None
        if other and other != e.name:
            reasons.append(f"the gates in {gates.path} were trained with it as {other!r}")
        if reasons:
            found[e.name] = reasons
    return found


def role_warnings(experts: list[ExpertFile], gates: GateFile | None = None) -> list[str]:
    """Signs that files sit under the wrong roles (face and hand swapped), one warning per file: the role our
    trainer wrote into the file, the file hashes the gates were trained with (`swapped`), and the authors' alphas
    (face 64, hand 128)."""
    by_name = {e.name: e for e in experts}
    out = [f"{by_name[name].path} is loaded as {name!r}, but {' and '.join(reasons)}: swapped files? Check the "
           "role names" for name, reasons in swapped(experts, gates).items()]
    by_role = {e.name: e for e in experts}
    if not any(trained_role(e) for e in experts) and {"face", "hand"} <= set(by_role):
        alphas = {role: by_role[role].alphas for role in ("face", "hand")}
        if alphas["face"] == {AUTHORS_ALPHAS["hand"]} and alphas["hand"] == {AUTHORS_ALPHAS["face"]}:
            out.append(f"the 'face' file {by_role['face'].path} has alpha 128 and the 'hand' file "
                       f"{by_role['hand'].path} alpha 64; in the authors' release the face LoRA has alpha 64 and "
                       "the hand LoRA 128: face and hand look swapped")
    return out


def describe(mole: "MoLE", experts: list[ExpertFile], gates: GateFile | None, settings, start: float,
             end: float, slots: tuple[str, ...] = ()) -> list[str]:
    """What an Apply MoLE attached, in lines an artist can read: experts with their files, ranks and strengths
    (and which node input sets each), layers, gate variant, mode and step range."""
    by_name = {e.name: e for e in experts}
    def name(path: str) -> str:
        return Path(path).name if path else "(in memory)"

    gate_text = f"gates: {mole.variant} variant from {name(gates.path)}" if gates is not None else "no gates"
    lines = [f"MoLE: {len(mole.order)} expert(s) on {len(mole.keys)} layers ({mole.layout.name}); {gate_text}; "
             f"mode {settings.mode}; acting from {start:.0%} to {end:.0%} of the steps"]
    for i, expert in enumerate(mole.order):
        e = by_name[expert]
        slot = f"{slots[i]} -> " if i < len(slots) else ""
        lines.append(f"  {slot}{expert}: {name(e.path)} ({rank_text(e)}), strength {settings.strength(expert):g}")
    return lines


def rank_text(e: ExpertFile) -> str:
    """"rank 256, alpha 64", or for a reduced expert "rank 12-64 (mean 31.5) of 256, alpha 64 (99% energy)"."""
    ranks = sorted(e.ranks)
    if e.source:
        kept = [w.rank for w in e.layers.values()]
        span = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]} (mean {sum(kept) / len(kept):.1f})"
        return f"rank {span} of {e.source['rank']}, alpha {e.source['alpha']:g} ({e.source.get('rule', 'reduced')})"
    alphas = sorted(e.alphas)
    return f"rank {ranks[0] if len(ranks) == 1 else ranks}, alpha {alphas[0] if len(alphas) == 1 else alphas}"


def expert_info(experts: list[ExpertFile]) -> dict[str, dict]:
    return {e.name: {"rank": max(e.ranks), "alpha": max(e.alphas), "sha256": e.sha256} for e in experts}


class MoLE(nn.Module):
    """Every MoLE layer of one model; `layer(key)` by layer key (`diffusion_model.<path>`)."""

    def __init__(self, layers: dict[str, MoLELayer], kohya_names: dict[str, str], order: tuple[str, ...],
                 variant: str, layout: UNetLayout, sources: dict[str, str] | None = None):
        super().__init__()
        self.keys = list(layers)
        self.layers = nn.ModuleDict({k.replace(".", ":"): v for k, v in layers.items()})
        self.kohya_names = dict(kohya_names)
        self.order, self.variant, self.layout = tuple(order), variant, layout
        self.sources = dict(sources or {})          # expert name -> the file it came from (for messages)

    def files(self) -> str:
        """The experts' files, for error messages: "face = a.safetensors, hand = b.safetensors"."""
        return ", ".join(f"{name} = {self.sources.get(name) or '(in memory)'}" for name in self.order)

    def layer(self, key: str) -> MoLELayer:
        return self.layers[key.replace(".", ":")]

    def items(self):
        return ((k, self.layer(k)) for k in self.keys)

    def gate_parameters(self) -> list[nn.Parameter]:
        """Every gate's weights and biases, layer by layer (local gate, then global gate)."""
        return [p for layer in self.layers.values() for m in (layer.local_gate, layer.global_gate)
                for p in m.parameters()]

    def expert_parameters(self) -> list[nn.Parameter]:
        """Every expert's down and up weights, layer by layer in column order."""
        return [p for layer in self.layers.values() for e in layer.experts.values() for p in (e.down, e.up)]

    def freeze(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.ModuleList:
        """Every layer's frozen inference stack in `dtype` on `device` (built once; see ops.FusedWeights), as one
        module a host can load, offload and count (it shares the stacks with the layers, it copies nothing)."""
        return nn.ModuleList([layer.freeze(dtype, device) for layer in self.layers.values()])

    def nbytes(self) -> dict[str, int]:
        """Resident bytes: experts, gates and frozen stacks (storages counted once)."""
        def size(tensors) -> int:
            seen = {}
            for t in tensors:
                seen[t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)] = t.numel() * t.element_size()
            return sum(seen.values())
        frozen = [t for layer in self.layers.values() if layer.frozen is not None for t in layer.frozen.parameters()]
        return {"experts": size(self.expert_parameters()), "gates": size(self.gate_parameters()),
                "frozen": size(frozen)}

    def export_gates(self, experts: list[ExpertFile], base_model: str = "") -> GateFile:
        """The gates as a gate file, keyed by the experts' own kohya names."""
        layers = {}
        for key, m in self.items():
            if self.variant == "official":
                gw = torch.cat([m.global_gate[n].weight for n in self.order])
                gb = torch.cat([m.global_gate[n].bias for n in self.order])
            else:
                gw, gb = m.global_gate.weight, m.global_gate.bias
            layers[self.kohya_names[key]] = GateWeights(*(t.detach().clone() for t in
                                                          (m.local_gate.weight, m.local_gate.bias, gw, gb)))
        return GateFile(self.variant, self.order, layers, expert_info(experts), base_model)


TRAINABLE = (None, "experts", "gates")


def build(experts: list[ExpertFile], gates: GateFile | None = None, layout: UNetLayout | None = None,
          variant: str | None = None, dtype: torch.dtype | None = None, trainable: str | None = None,
          log_warnings: bool = True) -> MoLE:
    """Experts and gates as modules. Without gates, fresh gates with PyTorch's default init (gates are fp32).

    Frozen unless `trainable` names what trains ("experts": stage 2, "gates": stage 3): a frozen MoLE is what
    inference runs, and the op picks its fused, cached path from requires_grad, so no caller sets it by hand.
    Frozen experts keep the files' tensors (no copy; `dtype` casts everything); training experts are fp32.
    The gate file's warnings (check_gates) are logged unless `log_warnings` is False (the nodes report them
    themselves, on every run: see `shared`).
    """
    if trainable not in TRAINABLE:
        raise MismatchError(f"trainable={trainable!r} is not one of {TRAINABLE}")
    if gates is not None:
        report = check_gates(gates, experts, layout)
        report.raise_if_errors(f"gate file {gates.path or '(in memory)'} does not fit the experts")
        for w in report.warnings if log_warnings else ():
            log.warning("MoLE: %s", w)
        variant = variant or gates.variant
        if variant != gates.variant:
            raise MismatchError(f"gate file {gates.path} holds {gates.variant} gates, {variant} was asked for")
    variant = variant or "official"
    if variant not in VARIANTS:
        raise MismatchError(f"gate variant {variant!r} is not one of {', '.join(VARIANTS)}")
    layout, keys = resolve_experts(experts, layout)
    gate_by_key = {} if gates is None else {v: gates.layers[k] for k, v in
                                            layout.resolve(list(gates.layers), "gates").items()}
    order = tuple(e.name for e in experts)
    layers = {}
    for key in layout.layer_keys:
        if key not in keys:
            continue
        widths = {e.name: (e.layers[keys[key]].down.shape[1], e.layers[keys[key]].up.shape[0]) for e in experts}
        if len(set(widths.values())) > 1:
            raise MismatchError(f"layer {keys[key]}: the experts map different widths (" + ", ".join(
                f"{e.name} = {e.path or '(in memory)'}: {widths[e.name][0]} -> {widths[e.name][1]}" for e in experts)
                + "); they were made for different base models")
        weights = dtype or (torch.float32 if trainable == "experts" else None)
        loras = {}
        for e in experts:
            w = e.layers[keys[key]]
            down, up = (w.down.detach(), w.up.detach()) if weights is None else \
                (w.down.detach().to(weights), w.up.detach().to(weights))
            loras[e.name] = LoRA(down.requires_grad_(False), up.requires_grad_(False), w.alpha)
        layer = MoLELayer(loras, order, variant)
        if dtype is not None:
            layer.to(dtype)
        if key in gate_by_key:
            _load_gate(layer, gate_by_key[key])
        layers[key] = layer
    mole = MoLE(layers, keys, order, variant, layout, {e.name: e.path for e in experts}).requires_grad_(False)
    for p in (mole.expert_parameters() if trainable == "experts" else
              mole.gate_parameters() if trainable == "gates" else []):
        p.requires_grad_(True)
    return mole


@torch.no_grad()
def _load_gate(layer: MoLELayer, g: GateWeights) -> None:
    layer.local_gate.weight.copy_(g.local_w)
    layer.local_gate.bias.copy_(g.local_b)
    if layer.variant == "official":
        for i, n in enumerate(layer.order):
            layer.global_gate[n].weight.copy_(g.global_w[i:i + 1])
            layer.global_gate[n].bias.copy_(g.global_b[i:i + 1])
    else:
        layer.global_gate.weight.copy_(g.global_w)
        layer.global_gate.bias.copy_(g.global_b)


_shared: "weakref.WeakValueDictionary[tuple, MoLE]" = weakref.WeakValueDictionary()


def shared(experts: list[ExpertFile], gates: GateFile | None, layout: UNetLayout) -> MoLE:
    """One frozen MoLE per set of expert and gate files in this process, for every node that uses them: keyed by
    the files' content hashes and the experts' names, kept while anything holds it. Settings never enter the key:
    modes and strengths act per call (ops.MoLELayer.forward). Experts or gates made in memory (no file hash) get
    a MoLE of their own. It logs no warning: a cached MoLE could not repeat them, so the nodes check the files
    (check_gates, role_warnings) on every run."""
    files = list(experts) + ([gates] if gates is not None else [])
    if not all(f.sha256 for f in files):
        return build(list(experts), gates, layout, log_warnings=False)
    key = (layout, tuple((e.name, e.sha256) for e in experts), None if gates is None else gates.sha256)
    mole = _shared.get(key)
    if mole is None:
        mole = build(list(experts), gates, layout, log_warnings=False)
        _shared[key] = mole
    return mole
