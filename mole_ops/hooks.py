"""Attach a MoLE to a module tree with forward hooks: the module tree and its state-dict keys never change.

The hook computes out = F(X) + gated experts on the output of each target module (so weight patches such as
stock LoRAs stay inside F). Whoever attaches keeps the handles and removes them; a `HookState` carries the
settings and the optional trace recorder, and may be changed between calls (schedule ranges, steps).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import MismatchError
from .mixture import MoLE
from .ops import GateSettings, MoLELayer
from .trace import GateTrace


@dataclass
class HookState:
    settings: GateSettings
    active: bool = True
    trace: GateTrace | None = None
    rows: torch.Tensor | None = None      # per-row expert multipliers (EMoE's batched members)


def check_modules(root: nn.Module, mole: MoLE) -> dict[str, nn.Module]:
    """{layer key: module} of root for every MoLE layer, with shape checks; MismatchError otherwise."""
    modules = dict(root.named_modules())
    missing = [k for k in mole.keys if k not in modules]
    if missing:
        raise MismatchError(f"{len(missing)} of {len(mole.keys)} MoLE layers do not exist in this model "
                            f"(first: {missing[0]}); the experts ({mole.files()}) were made for another base "
                            f"({mole.layout.name}?)")
    out = {}
    for key, layer in mole.items():
        weight = getattr(modules[key], "weight", None)
        shape = tuple(weight.shape[:2]) if weight is not None else None
        if shape != (layer.d_out, layer.d_in) or (weight.ndim == 4 and tuple(weight.shape[2:]) != (1, 1)):
            raise MismatchError(f"layer {key}: the model's weight is {tuple(weight.shape) if weight is not None else None}"
                                f", the experts ({mole.files()}) map {layer.d_in} -> {layer.d_out}; they were made "
                                "for another base")
        out[key] = modules[key]
    return out


def run_layer(key: str, layer: MoLELayer, x, output, settings: GateSettings, trace: GateTrace | None,
              rows: torch.Tensor | None = None):
    """The hook body shared by every dispatcher: the gated experts on one layer, recorded into `trace` if given."""
    def record(local, glob, names):
        trace.record(key, local, glob, names)

    return layer(x, output, settings, record if trace is not None else None, rows)


def _hook(key: str, layer: MoLELayer, state: HookState):
    def hook(module, args, output):
        if not state.active:
            return output
        return run_layer(key, layer, args[0], output, state.settings, state.trace, state.rows)
    return hook


def attach(root: nn.Module, mole: MoLE, state: HookState) -> list[RemovableHandle]:
    """Register one forward hook per MoLE layer on root's modules (paths = layer keys); returns the handles."""
    return [module.register_forward_hook(_hook(key, mole.layer(key), state))
            for key, module in check_modules(root, mole).items()]


@contextmanager
def attached(root: nn.Module, mole: MoLE | None, state: HookState):
    """`attach` for the length of a `with` block; the hooks are removed however the block ends. With mole None,
    nothing is attached (the base alone)."""
    handles = attach(root, mole, state) if mole is not None else []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
