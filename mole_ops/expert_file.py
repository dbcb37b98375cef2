"""Expert files: standard kohya LoRA safetensors (SPEC.md section 4).

Keys `<name>.lora_down.weight` (r, d_in[,1,1]), `<name>.lora_up.weight` (d_out, r[,1,1]), `<name>.alpha`, where
<name> is a kohya name in diffusers or SGM naming, or `diffusion_model.<path>`. A missing alpha means alpha =
rank (kohya's rule). kohya metadata (`ss_*`, `sshs_model_hash`, `modelspec.*`) is read and written.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import safetensors_io
from .errors import FormatError

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
SOURCE_KEY = "mole.resized_from"     # a reduced expert's source: {"sha256", "rank", "alpha", "rule"} (rank.py)
ROLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
BASE_VERSIONS = {"SD1.5": "sd_v1", "SDXL": "sdxl_base_v1-0"}
ARCHITECTURES = {"SD1.5": "stable-diffusion-v1/lora", "SDXL": "stable-diffusion-xl-v1-base/lora"}


def check_role_name(name: str, where: str = "") -> str:
    """`name` if it is a valid expert role name, else FormatError (naming `where`, the file, when given)."""
    if not isinstance(name, str) or not ROLE_NAME.match(name):
        raise FormatError(f"{where + ': ' if where else ''}expert name {name!r}: use letters, digits, '_' or '-' "
                          "(e.g. face, hand, feet)")
    return name


@dataclass
class LoRAWeights:
    """One layer of an expert, 2-D (a 1x1 conv's kernels squeezed; `conv` remembers it for saving)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    conv: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class ExpertFile:
    """A named expert: {kohya name: LoRAWeights}, with the file's metadata and tensor-data sha256."""

    name: str
    layers: dict[str, LoRAWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    path: str = ""
    source: dict | None = None       # reduced from another file (rank.py): its sha256, rank, alpha and the rule
    reduction: object = field(default=None, repr=False, compare=False)     # rank.Reduction, when reduced here

    @property
    def origin_sha256(self) -> str:
        """The sha256 of the file this expert was trained as: its source's if it was reduced, else its own."""
        return (self.source or {}).get("sha256") or self.sha256

    @property
    def ranks(self) -> set[int]:
        return {w.rank for w in self.layers.values()}

    @property
    def alphas(self) -> set[float]:
        return {w.alpha for w in self.layers.values()}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, w in self.layers.items():
            out[f"{name}.lora_down.weight"] = w.down[:, :, None, None] if w.conv else w.down
            out[f"{name}.lora_up.weight"] = w.up[:, :, None, None] if w.conv else w.up
            out[f"{name}.alpha"] = torch.tensor(float(w.alpha), dtype=w.down.dtype)
        return out


def parse(tensors: dict[str, torch.Tensor], where: str) -> dict[str, LoRAWeights]:
    """Group kohya LoRA tensors by layer, strictly; `where` names the source in errors."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, t in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            stray.append(key)
            continue
        groups.setdefault(key[: -len(suffix)], {})[suffix] = t
    if stray:
        raise FormatError(f"{where}: {len(stray)} keys are not kohya LoRA keys (first: {stray[:3]}); an expert holds "
                          "only <layer>.lora_down.weight, <layer>.lora_up.weight and <layer>.alpha")
    if not groups:
        raise FormatError(f"{where}: holds no LoRA layers")
    text = [n for n in groups if n.startswith("lora_te")]
    if text:
        raise FormatError(f"{where}: {len(text)} text-encoder layers (first: {text[0]}); MoLE experts are UNet-only, "
                          "save the expert without the text encoder")
    layers = {}
    for name, g in sorted(groups.items()):
        missing = [s for s in SUFFIXES[:2] if s not in g]
        if missing:
            raise FormatError(f"{where}: layer {name!r} lacks {name}{missing[0]}")
        down, up = g[SUFFIXES[0]], g[SUFFIXES[1]]
        conv = down.ndim == 4
        if conv:
            if down.shape[2:] != (1, 1) or up.ndim != 4 or up.shape[2:] != (1, 1):
                raise FormatError(f"{where}: layer {name!r} has {tuple(down.shape)} kernels; only Linear and 1x1 "
                                  "conv layers can be MoLE experts (not LoCon 3x3 layers)")
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise FormatError(f"{where}: layer {name!r}: lora_down {tuple(g[SUFFIXES[0]].shape)} and lora_up "
                              f"{tuple(g[SUFFIXES[1]].shape)} do not chain (expected (r, d_in) and (d_out, r))")
        alpha = g.get(SUFFIXES[2])
        if alpha is not None and alpha.numel() != 1:
            raise FormatError(f"{where}: {name}.alpha has shape {tuple(alpha.shape)}, expected a scalar")
        layers[name] = LoRAWeights(down, up, float(alpha) if alpha is not None else float(down.shape[0]), conv)
    return layers


def load(path: str | Path, name: str) -> ExpertFile:
    """Load a kohya LoRA as the expert `name` (its role: face, hand, ...)."""
    tensors, metadata, sha = safetensors_io.read(path)
    return ExpertFile(check_role_name(name), parse(tensors, str(path)), metadata, sha, str(path),
                      source=read_source(metadata, str(path)))


def read_source(metadata: dict[str, str], where: str) -> dict | None:
    """The `mole.resized_from` record of a resized expert, checked (sha256 of 64 hex digits, rank >= 1, alpha,
    rule), or None; anything else is a FormatError naming the file and the key."""
    text = metadata.get(SOURCE_KEY)
    if text in (None, ""):
        return None
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        value = None
    ok = (isinstance(value, dict) and isinstance(value.get("sha256"), str)
          and re.fullmatch(r"[0-9a-f]{64}", value["sha256"]) is not None
          and isinstance(value.get("rank"), int) and not isinstance(value.get("rank"), bool) and value["rank"] >= 1
          and isinstance(value.get("alpha"), (int, float)) and not isinstance(value.get("alpha"), bool)
          and isinstance(value.get("rule", ""), str))
    if not ok:
        raise FormatError(f"{where}: metadata {SOURCE_KEY} should be a JSON object with sha256 (64 hex digits), "
                          f"rank (a whole number >= 1), alpha (a number) and rule (text); found {str(text)[:80]!r}")
    return value


def kohya_metadata(expert: ExpertFile, family: str, sha256: str, steps: int = 0, comment: str = "") -> dict[str, str]:
    ranks, alphas = sorted(expert.ranks), sorted(expert.alphas)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "ss_network_alpha": str(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
        "ss_network_args": json.dumps({"mole_expert": expert.name}),
        "ss_base_model_version": BASE_VERSIONS.get(family, family),
        "ss_output_name": expert.name,
        "ss_training_comment": comment,
        "ss_steps": str(steps),
        "sshs_model_hash": sha256,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES.get(family, family),
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": expert.name,
    }


def save(path: str | Path, expert: ExpertFile, family: str = "SD1.5", steps: int = 0, comment: str = "") -> str:
    """Write a kohya LoRA with kohya metadata (merged over expert.metadata); returns the data sha256."""
    tensors = expert.tensors()
    sha = safetensors_io.data_sha256(tensors)
    metadata = {**expert.metadata, **kohya_metadata(expert, family, sha, steps, comment)}
    safetensors_io.write(path, tensors, metadata)
    return sha
