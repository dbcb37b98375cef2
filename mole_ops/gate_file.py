"""Gate files (SPEC.md section 4): the authors' key layout, extended to N experts and the paper variant.

Per layer (kohya name of the expert layer):
    moe_<layer>.softmoe.Phi_1.weight (N, d_in), .bias (N)          local gate, rows in expert order
    moe_<layer>.softmoe.<role>_scale.weight (1, d_out), .bias (1)   official global gate, one per expert
    moe_<layer>.softmoe.global_gate.weight (N, d_in), .bias (N)     paper global gate
Metadata (ours; the authors' files have none and load as official with order face, hand):
    mole.format_version, mole.variant, mole.experts (JSON list, column order),
    mole.expert_info (JSON {name: {rank, alpha, sha256}}), mole.base_model (fingerprint of the base UNet,
    fingerprint.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import safetensors_io
from .errors import FormatError
from .expert_file import check_role_name

FORMAT_VERSION = "1"
# the fields of mole.expert_info per expert that check_gates reads: (key, JSON types, what is expected)
INFO_FIELDS = (("rank", int, "an integer"), ("alpha", (int, float), "a number"), ("sha256", str, "a hex string"))
AUTHORS_ORDER = ("face", "hand")
PREFIX, INFIX = "moe_", ".softmoe."


@dataclass
class GateWeights:
    """Gates of one layer: local (N, d_in) + (N,); global (N, d_out) official or (N, d_in) paper, + (N,)."""

    local_w: torch.Tensor
    local_b: torch.Tensor
    global_w: torch.Tensor
    global_b: torch.Tensor


@dataclass
class GateFile:
    variant: str
    experts: tuple[str, ...]
    layers: dict[str, GateWeights]
    expert_info: dict[str, dict] = field(default_factory=dict)
    base_model: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""
    sha256: str = ""          # of the file's tensor data, when loaded from a file

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, g in self.layers.items():
            p = f"{PREFIX}{name}{INFIX}"
            out[p + "Phi_1.weight"], out[p + "Phi_1.bias"] = g.local_w, g.local_b
            if self.variant == "official":
                for i, role in enumerate(self.experts):
                    out[p + f"{role}_scale.weight"] = g.global_w[i:i + 1]
                    out[p + f"{role}_scale.bias"] = g.global_b[i:i + 1]
            else:
                out[p + "global_gate.weight"], out[p + "global_gate.bias"] = g.global_w, g.global_b
        return out

    def meta(self) -> dict[str, str]:
        return {**self.metadata, "mole.format_version": FORMAT_VERSION, "mole.variant": self.variant,
                "mole.experts": json.dumps(list(self.experts)), "mole.expert_info": json.dumps(self.expert_info),
                "mole.base_model": self.base_model}


def _group(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    stray = [k for k in tensors if not (k.startswith(PREFIX) and INFIX in k)]
    if stray:
        raise FormatError(f"{where}: {len(stray)} keys are not gate keys (first: {stray[:3]}); expected "
                          f"'moe_<layer>.softmoe.<part>.weight|bias'. Is this an expert LoRA rather than a gate file?")
    for key, t in tensors.items():
        layer, part = key[len(PREFIX):].split(INFIX, 1)
        groups.setdefault(layer, {})[part] = t
    if not groups:
        raise FormatError(f"{where}: holds no gates")
    return groups


def _order(groups, metadata, where) -> tuple[tuple[str, ...], str]:
    parts = set().union(*groups.values())
    version = metadata.get("mole.format_version")
    if version not in (None, FORMAT_VERSION):
        raise FormatError(f"{where}: metadata mole.format_version is {version[:40]!r}; this version of ComfyUI-MoLE "
                          f"reads gate files of format {FORMAT_VERSION!r} (update ComfyUI-MoLE, or re-save the file)")
    variant = metadata.get("mole.variant") or ("paper" if "global_gate.weight" in parts else "official")
    if variant not in ("official", "paper"):
        raise FormatError(f"{where}: mole.variant {variant!r} is not 'official' or 'paper'")
    if "mole.experts" in metadata:
        order = tuple(safetensors_io.json_metadata(metadata, "mole.experts", where, "names", []))
    else:
        roles = sorted({p[: -len("_scale.weight")] for p in parts if p.endswith("_scale.weight")})
        if variant != "official" or set(roles) != set(AUTHORS_ORDER):
            raise FormatError(f"{where}: no mole.experts metadata, and the roles {roles} are not the authors' "
                              "(face, hand); re-save the file with its expert order")
        order = AUTHORS_ORDER
    for role in order:
        check_role_name(role, f"{where} mole.experts")
    return order, variant


def parse(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> GateFile:
    groups = _group(tensors, where)
    order, variant = _order(groups, metadata, where)
    n = len(order)
    global_parts = ([f"{r}_scale.{s}" for r in order for s in ("weight", "bias")] if variant == "official"
                    else ["global_gate.weight", "global_gate.bias"])
    expected = {"Phi_1.weight", "Phi_1.bias", *global_parts}
    layers = {}
    for layer, parts in sorted(groups.items()):
        missing, extra = sorted(expected - set(parts)), sorted(set(parts) - expected)
        if missing or extra:
            raise FormatError(f"{where}: layer {layer!r}: missing {[f'moe_{layer}.softmoe.{m}' for m in missing][:3]}, "
                              f"unexpected {extra[:3]} (experts {list(order)}, {variant} variant)")
        lw, lb = parts["Phi_1.weight"], parts["Phi_1.bias"]
        if lw.ndim != 2 or lw.shape[0] != n or lb.shape != (n,):
            raise FormatError(f"{where}: moe_{layer}.softmoe.Phi_1 has weight {tuple(lw.shape)}, bias "
                              f"{tuple(lb.shape)}; expected ({n}, d_in) and ({n},) for experts {list(order)}")
        if variant == "official":
            ws = [parts[f"{r}_scale.weight"] for r in order]
            bs = [parts[f"{r}_scale.bias"] for r in order]
            if any(w.ndim != 2 or w.shape[0] != 1 or w.shape != ws[0].shape for w in ws) or \
                    any(b.shape != (1,) for b in bs):
                raise FormatError(f"{where}: moe_{layer}.softmoe.<role>_scale shapes "
                                  f"{[tuple(w.shape) for w in ws]}; expected (1, d_out) weights and (1,) biases")
            gw, gb = torch.cat(ws), torch.cat(bs)
        else:
            gw, gb = parts["global_gate.weight"], parts["global_gate.bias"]
            if gw.shape != lw.shape or gb.shape != (n,):
                raise FormatError(f"{where}: moe_{layer}.softmoe.global_gate has weight {tuple(gw.shape)}; "
                                  f"expected {tuple(lw.shape)} like Phi_1")
        layers[layer] = GateWeights(lw, lb, gw, gb)
    info = safetensors_io.json_metadata(metadata, "mole.expert_info", where, "object of objects", {})
    for name, entry in info.items():
        for key, types, expected in INFO_FIELDS:
            if key in entry and (isinstance(entry[key], bool) or not isinstance(entry[key], types)):
                raise FormatError(f"{where}: metadata mole.expert_info[{name!r}].{key} should be {expected}, found "
                                  f"{json.dumps(entry[key])[:80]}")
    return GateFile(variant, order, layers, info, metadata.get("mole.base_model", ""), dict(metadata), where)


def load(path: str | Path) -> GateFile:
    tensors, metadata, sha = safetensors_io.read(path)
    gates = parse(tensors, metadata, str(path))
    gates.sha256 = sha
    return gates


def save(path: str | Path, gates: GateFile) -> Path:
    return safetensors_io.write(path, gates.tensors(), gates.meta())
