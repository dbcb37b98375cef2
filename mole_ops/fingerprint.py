"""Base-model fingerprint: which base UNet an expert or gate file was trained on.

A short sha256 over a few UNet tensors that any fine-tune changes (the input conv, the first time-embedding linear,
the output conv), taken in fp16 so that the same weights give the same fingerprint whether the model was loaded in
fp32, fp16 or bf16-from-fp16. Our trainer writes it to expert and gate metadata (`mole.base_model`); files
without it (stock kohya LoRAs, the authors' releases) are not checked.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

KEYS = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")
METADATA_KEY = "mole.base_model"
PREFIX = "unet-sha256:"


def fingerprint(unet: nn.Module) -> str:
    """Fingerprint of a ComfyUI UNet (`model.model.diffusion_model`)."""
    digest = hashlib.sha256()
    for key in KEYS:
        t = unet.get_parameter(key).detach()
        digest.update(key.encode())
        digest.update(t.to(device="cpu", dtype=torch.float16).contiguous().numpy().tobytes())
    return PREFIX + digest.hexdigest()[:16]


def mismatches(base: str, files: dict[str, str]) -> list[str]:
    """Warnings for files ({description: their fingerprint or ''}) trained on another base than `base`."""
    return [f"{what} was trained on another base model ({fp}, this model is {base}); it may not fit it"
            for what, fp in files.items() if fp.startswith(PREFIX) and fp != base]


def check_base(unet: nn.Module, experts, gates=None) -> list[str]:
    """Warnings for experts (ExpertFile) and gates (GateFile or None) whose metadata names another base."""
    files = {f"expert {e.name!r} ({e.path})": e.metadata.get(METADATA_KEY, "") for e in experts}
    if gates is not None:
        files[f"gate file {gates.path}"] = gates.base_model
    if not any(fp.startswith(PREFIX) for fp in files.values()):
        return []
    return mismatches(fingerprint(unet), files)
