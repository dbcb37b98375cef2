"""Gate trace: what the gates did during one sampling run, aggregated while sampling in bounded memory.

Per step, per expert and per batch row, separately for cond and uncond rows:
- the local-gate map averaged over image-token layers (not attn2.to_k/to_v, whose tokens are text), each layer's
  map resized to latent resolution;
- the mean global gate over all layers.
Memory: steps x rows x experts x latent H x W floats; nothing per layer is kept.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import reads_text_tokens

COND, UNCOND = 0, 1
KINDS = {COND: "cond", UNCOND: "uncond"}


def token_grid(n: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of n image tokens in a UNet level of a latent of height x width."""
    for f in (1, 2, 4, 8, 16, 32, 64):
        h, w = math.ceil(height / f), math.ceil(width / f)
        if h * w == n:
            return h, w
    raise ValueError(f"{n} tokens fit no downsampling of a {height}x{width} latent")


class GateTrace:
    """The recorder. A `fork()` records on its own and passes every call on to the trace it was forked from, so
    the original sees the runs of all its forks while forks never see each other's (a ModelPatcher clone gets a
    fork: the trace output of Apply MoLE still shows runs of models made from it)."""

    def __init__(self, experts: tuple[str, ...], parent: "GateTrace | None" = None):
        self.experts = tuple(experts)
        self.parent = parent
        self.local: dict[tuple[int, int], torch.Tensor] = {}    # (step, kind) -> (rows, N, H, W) sum
        self.local_n: dict[tuple[int, int], int] = {}
        self.glob: dict[tuple[int, int], torch.Tensor] = {}     # (step, kind) -> (rows, N) sum
        self.glob_n: dict[tuple[int, int], int] = {}
        self.latent_hw: tuple[int, int] | None = None
        self._call = None
        self._last_step: int | None = None

    def fork(self) -> "GateTrace":
        return GateTrace(self.experts, parent=self)

    def clear(self) -> None:
        for store in (self.local, self.local_n, self.glob, self.glob_n):
            store.clear()
        self._last_step = None

    # -- while sampling ----------------------------------------------------------------------------------
    def begin_call(self, step: int, latent_hw: tuple[int, int], row_kinds: list[int]) -> None:
        """Start one model call: its step index, latent size, and the kind (COND/UNCOND) of each batch row."""
        if self._last_step is not None and step < self._last_step:
            self.clear()  # a new sampling run reuses this trace: keep only the newest run
        self._last_step = step
        self.latent_hw = tuple(latent_hw)
        self._call = {"step": step, "rows": list(row_kinds), "local": {}, "glob": None, "layers": 0, "glayers": 0}
        if self.parent is not None:
            self.parent.begin_call(step, latent_hw, row_kinds)

    def record(self, layer_key: str, local: torch.Tensor | None, glob: torch.Tensor | None, names) -> None:
        """local (B, n, N_active) or None, glob (B, N_active) or None, names: the active experts' names."""
        if self.parent is not None:
            self.parent.record(layer_key, local, glob, names)
        call = self._call
        if call is None:
            return
        cols = [self.experts.index(n) for n in names]
        if local is not None and not reads_text_tokens(layer_key):
            b, n, _ = local.shape
            h, w = token_grid(n, *self.latent_hw)
            grid = local.detach().float().transpose(1, 2).reshape(b, len(cols), h, w)
            acc = call["local"].get((h, w))
            if acc is None:
                acc = call["local"][(h, w)] = torch.zeros(b, len(self.experts), h, w, device=grid.device)
            acc[:, cols] += grid
            call["layers"] += 1
        if glob is not None:
            if call["glob"] is None:
                call["glob"] = torch.zeros(glob.shape[0], len(self.experts), device=glob.device)
            call["glob"][:, cols] += glob.detach().float()
            call["glayers"] += 1

    def end_call(self) -> None:
        if self.parent is not None:
            self.parent.end_call()
        call, self._call = self._call, None
        if call is None:
            return
        step, rows = call["step"], call["rows"]
        maps = None
        if call["layers"]:
            maps = sum(F.interpolate(acc, size=self.latent_hw, mode="bilinear", align_corners=False)
                       for acc in call["local"].values()) / call["layers"]
        glob = call["glob"] / call["glayers"] if call["glayers"] else None
        for kind in set(rows):
            idx = [i for i, k in enumerate(rows) if k == kind]
            if maps is not None:
                self._add(self.local, self.local_n, (step, kind), maps[idx].cpu())
            if glob is not None:
                self._add(self.glob, self.glob_n, (step, kind), glob[idx].cpu())

    @staticmethod
    def _add(store, counts, key, value):
        if key in store and store[key].shape == value.shape:
            store[key] += value
            counts[key] += 1
        else:
            store[key], counts[key] = value.clone(), 1

    # -- afterwards ----------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted({s for s, _ in list(self.local) + list(self.glob)})

    def local_maps(self, kind: int = COND) -> torch.Tensor:
        """(steps, rows, N, H, W): local-gate maps per step (mean over layers and calls)."""
        return torch.stack([self.local[(s, kind)] / self.local_n[(s, kind)] for s in self.steps()
                            if (s, kind) in self.local])

    def global_curve(self, kind: int = COND) -> torch.Tensor:
        """(steps, rows, N): mean global gate per step."""
        return torch.stack([self.glob[(s, kind)] / self.glob_n[(s, kind)] for s in self.steps()
                            if (s, kind) in self.glob])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.local.values()) + list(self.glob.values()))
