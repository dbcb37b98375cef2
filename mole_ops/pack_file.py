"""MoLE pack: one safetensors file with the experts, the gates and their metadata, for distribution.

Keys `expert.<name>.<kohya LoRA key>` and `gate.<gate-file key>`; metadata `mole.pack_version`,
`mole.pack_experts` (JSON list, column order), `mole.expert_metadata` (JSON {name: that expert's metadata}),
plus the gate file's own `mole.*` fields, and optionally a card (`card.py`: `modelspec.*`, `mole.pack_base_model`,
`mole.pack_recommended`), which a load reads leniently (`load_card`).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import card as card_format
from . import expert_file, gate_file, safetensors_io
from .errors import FormatError

PACK_VERSION = "1"


def save(path: str | Path, experts: list[expert_file.ExpertFile], gates: gate_file.GateFile,
         card: dict[str, str] | None = None) -> Path:
    """`card`: card.to_metadata's keys, written beside the pack's own."""
    names = [e.name for e in experts]
    if tuple(names) != gates.experts:
        raise FormatError(f"{path}: experts {names} are not the gates' column order {list(gates.experts)}")
    tensors = {f"expert.{e.name}.{k}": v for e in experts for k, v in e.tensors().items()}
    tensors.update({f"gate.{k}": v for k, v in gates.tensors().items()})
    metadata = {**gates.meta(), "mole.pack_version": PACK_VERSION, "mole.pack_experts": json.dumps(names),
                "mole.expert_metadata": json.dumps({e.name: e.metadata for e in experts})}
    metadata = {k: v for k, v in metadata.items() if not k.startswith(CARD_PREFIXES)}
    metadata.update(card or {})
    return safetensors_io.write(path, tensors, metadata)


CARD_PREFIXES = ("modelspec.", "mole.pack_base_model", "mole.pack_recommended")


def load_card(metadata: dict[str, str]) -> tuple[card_format.Card | None, list[str]]:
    """A pack's card from its metadata (None without one) and what in it was malformed; never raises."""
    return card_format.from_metadata(metadata)


def is_pack(metadata: dict[str, str]) -> bool:
    return "mole.pack_version" in metadata


def load(path: str | Path, with_metadata: bool = False):
    """(experts, gates) of a pack; with `with_metadata`, (experts, gates, its metadata) (for load_card)."""
    tensors, metadata, _ = safetensors_io.read(path)
    where = str(path)
    if not is_pack(metadata):
        raise FormatError(f"{where}: not a MoLE pack (no mole.pack_version metadata); load it as an expert or a "
                          "gate file instead")
    names = safetensors_io.json_metadata(metadata, "mole.pack_experts", where, "names")
    if names is None:
        raise FormatError(f"{where}: pack metadata mole.pack_experts is missing (the experts' names, in order)")
    expert_meta = safetensors_io.json_metadata(metadata, "mole.expert_metadata", where, "object of objects", {})
    stray = [k for k in tensors if not k.startswith(("expert.", "gate."))]
    if stray:
        raise FormatError(f"{where}: unexpected keys {stray[:3]}; a pack holds only 'expert.*' and 'gate.*' keys")
    experts = []
    for name in names:
        prefix = f"expert.{name}."
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        meta = expert_meta.get(name, {})
        sha = safetensors_io.data_sha256(part)
        experts.append(expert_file.ExpertFile(expert_file.check_role_name(name, f"{where} mole.pack_experts"),
                                              expert_file.parse(part, f"{where} [expert {name}]"), meta, sha, where,
                                              source=expert_file.read_source(meta, f"{where} [expert {name}]")))
    known = tuple(f"expert.{n}." for n in names)
    orphans = [k for k in tensors if k.startswith("expert.") and not k.startswith(known)]
    if orphans:
        raise FormatError(f"{where}: expert keys for experts not listed in mole.pack_experts: {orphans[:3]}")
    gate_meta = {k: v for k, v in metadata.items()
                 if not k.startswith(("mole.pack_", "mole.expert_metadata") + CARD_PREFIXES)}
    gates = gate_file.parse({k[5:]: v for k, v in tensors.items() if k.startswith("gate.")}, gate_meta,
                            f"{where} [gates]")
    return (experts, gates, metadata) if with_metadata else (experts, gates)
