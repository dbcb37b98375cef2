"""The gated mixture of low-rank experts on one layer: the only implementation of MoLE's math.

For a wrapped layer F with input X (batch B, tokens n, channels d_in; for a 1x1 conv the tokens are the H*W
positions) and experts i = 0..N-1 in column order:

    R_i(X) = c_i * up_i(down_i(X))                     c_i = alpha_i / rank_i, bias-free
    L(X)   = sigmoid(X @ Phi.T + phi_b)                 (B, n, N)  local gate, per token
    G_i    = sigmoid(w_i . mean_n(R_i(X)) + b_i)        (B, N)     global gate, "official" variant
    G      = sigmoid(mean_n(X) @ Wg.T + bg)             (B, N)     global gate, "paper" variant
    out    = F(X) + sum_i s_i * L_i * G_i * R_i(X)      s_i = per-expert strength (0 = off)

Modes drop gates: "local" uses G = 1, "global" uses L = 1, "none" uses both = 1 (experts at fixed scale).
While experts train (stage 2) with a dropout p (kohya's --network_dropout), down_i(X) is dropped out (each hidden
unit zeroed with probability p, the rest scaled by 1/(1-p)) before up_i; never under no_grad.

Fused evaluation (what makes it fast): one matmul X @ W1.T with W1 = [down_0; ...; down_{N-1}; Phi; V; pad]
gives every expert's hidden block, the local-gate logits and the global-gate logits at once. The global gate
is linear in X before its sigmoid, so it folds into W1 exactly: official v_i = c_i * down_i.T @ up_i.T @ w_i.T
(mean_n(X @ v_i) = w_i . mean_n(R_i)), paper v_i = Wg_i. Then the hidden blocks are scaled per token by
s_i L_i G_i and one matmul with U = [c_0 up_0, ..., c_{N-1} up_{N-1}] is accumulated straight into F(X).

Frozen experts on a layer narrower than their summed ranks (SD1.5's 320-wide layers, two rank-256 experts) run dense
instead: W1 holds c_i up_i down_i (d_out x d_in) per expert, and the gated sum of the N output blocks is the
delta, no second matmul (dense_pays decides). While gates train on frozen experts, the gate rows are a matmul of
their own, so backward computes no weight gradient for the experts' rows.

The frozen stack (FusedWeights) does not depend on the settings: every expert and both gates' rows are in it,
and mode and strengths act on the small per-token factors. So one stack serves every Apply MoLE on the same files;
it is a module of frozen parameters, which ComfyUI's ModelPatcher can load, offload and count like weights. Experts
at strength 0 before the first or after the last active one are left out of the matmuls (views of their rows, no
copy: an ablation's face-only and hand-only nodes cost one expert each); one at strength 0 between two active
ones is still computed (and multiplied by 0).

Compute dtype: the activation's, except bf16/fp16 activations on a CPU without native units for them (no
AVX512-BF16/AMX-BF16, no AVX512-FP16/AMX-FP16). There those matmuls are emulated and several times slower than
fp32, so the expert path runs in fp32 and its sum is added to the half-precision F(X) (more exact, too).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from .errors import MoLEError

MODES = ("both", "local", "global", "none")
VARIANTS = ("official", "paper")
PAD_TO = 16  # bf16 matmuls are much faster when the output width is a multiple of 16
# Gate factors below this are set to 0: their terms are below any float's resolution, and sigmoid of a strongly
# negative logit is a denormal float, which x86 CPUs compute ~10x slower (it made the up projection of a closed
# gate cost more than the whole layer).
TINY = 1e-20


@dataclass(frozen=True)
class GateSettings:
    """How the gates are used: mode (both / local / global / none) and per-expert strength (0 = off); `dropout`:
    kohya's neuron dropout on the experts' hidden units, applied only while gradients are on (training)."""

    mode: str = "both"
    strengths: Mapping[str, float] = field(default_factory=dict)
    dropout: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise MoLEError(f"gate mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise MoLEError(f"expert dropout {self.dropout} is not in [0, 1)")

    def strength(self, name: str) -> float:
        return float(self.strengths.get(name, 1.0))

    @property
    def local(self) -> bool:
        return self.mode in ("both", "local")

    @property
    def glob(self) -> bool:
        return self.mode in ("both", "global")


def dense_pays(d_in: int, d_out: int, n: int, rank_total: int) -> bool:
    """Whether frozen experts are cheaper as n dense (d_out, d_in) matrices than as low-rank pairs: per token the
    dense first matmul costs n d_out d_in multiply-adds plus the gated sum of n output blocks (counted as 16 each,
    it is memory-bound), the low-rank pair R (d_in + d_out). True on SD1.5's 320-wide layers with two rank-256
    experts (205k + 10k < 328k), false on the 640- and 1280-wide ones."""
    return n * d_out * (d_in + 16) < rank_total * (d_in + d_out)


@functools.cache
def _native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix units for the half type (else oneDNN emulates it)."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return True                       # unknown: keep the activation's dtype
    names = ("avx512_bf16", "amx_bf16") if dtype == torch.bfloat16 else ("avx512_fp16", "amx_fp16")
    return any(bool(caps.get(n)) for n in names)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls of activation x run in (see the module docstring). Under CPU autocast the
    activation's dtype is kept (autocast would cast the matmuls back anyway)."""
    if x.device.type == "cpu" and _cpu_autocast():
        return x.dtype
    return compute_dtype_for(x.device, x.dtype)


def compute_dtype_for(device: torch.device | str, activation_dtype: torch.dtype) -> torch.dtype:
    """The dtype the experts compute in for activations of this dtype on this device: the activation's, but fp32
    for half-precision activations on a CPU without native half matrix units."""
    if torch.device(device).type != "cpu" or activation_dtype not in (torch.bfloat16, torch.float16):
        return activation_dtype
    return activation_dtype if _native_half(activation_dtype) else torch.float32


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:                     # torch < 2.4
        return torch.is_autocast_cpu_enabled()


class LoRA(nn.Module):
    """One expert on one layer: R(X) = scale * up(down(X)), scale = alpha / rank. 2-D weights; a 1x1 conv's
    (r, d_in, 1, 1) kernels are stored squeezed."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float):
        super().__init__()
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise MoLEError(f"LoRA shapes do not chain: down {tuple(down.shape)}, up {tuple(up.shape)}")
        self.down = nn.Parameter(down, requires_grad=down.requires_grad)
        self.up = nn.Parameter(up, requires_grad=up.requires_grad)
        self.alpha = float(alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class MoLELayer(nn.Module):
    """Experts (ModuleDict by name), a local gate and a global gate for one layer, with explicit column order.

    local_gate: Linear(d_in, N), row i for order[i]. global_gate: official ModuleDict {name: Linear(d_out, 1)};
    paper Linear(d_in, N). Fresh gates use PyTorch's default Linear init (every gate starts near 0.5).
    """

    def __init__(self, experts: Mapping[str, LoRA], order: tuple[str, ...], variant: str = "official"):
        super().__init__()
        if variant not in VARIANTS:
            raise MoLEError(f"gate variant {variant!r} is not one of {', '.join(VARIANTS)}")
        if set(order) != set(experts) or len(order) != len(set(order)) or not order:
            raise MoLEError(f"expert order {order} does not match experts {sorted(experts)}")
        self.order = tuple(order)
        self.variant = variant
        self.experts = nn.ModuleDict({n: experts[n] for n in order})
        first = self.experts[order[0]]
        self.d_in, self.d_out = first.down.shape[1], first.up.shape[0]
        for n, e in self.experts.items():
            if e.down.shape[1] != self.d_in or e.up.shape[0] != self.d_out:
                raise MoLEError(f"expert {n!r} maps {e.down.shape[1]}->{e.up.shape[0]}, "
                                f"expert {order[0]!r} {self.d_in}->{self.d_out}")
        self.local_gate = nn.Linear(self.d_in, len(order))             # gates in fp32 whatever the experts'
        if variant == "official":
            self.global_gate = nn.ModuleDict({n: nn.Linear(self.d_out, 1) for n in order})
        else:
            self.global_gate = nn.Linear(self.d_in, len(order))
        self.frozen: FusedWeights | None = None       # the inference stack (freeze); a child module
        self._stacks: dict = {}                       # training-time expert stacks (gates train), per device/dtype

    # -- fused weights ---------------------------------------------------------------------------------
    def global_vectors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, b) of every expert: rows v_i with mean_n(X @ v_i) + b_i = the global-gate logit of order[i];
        official vectors are computed in fp32 (or `dtype`) from the experts, whatever dtype they are stored in."""
        if self.variant == "paper":
            return self.global_gate.weight, self.global_gate.bias
        dtype = dtype or torch.float32
        rows, bias = [], []
        for name in self.order:
            e, g = self.experts[name], self.global_gate[name]
            down, up, w = e.down.to(dtype), e.up.to(dtype), g.weight.to(dtype)
            rows.append(e.scale * (down.T @ (up.T @ w.T)).T)
            bias.append(g.bias)
        return torch.cat(rows), torch.cat(bias)

    def _global_gate_params(self) -> list[torch.Tensor]:
        if self.variant == "paper":
            return [self.global_gate.weight, self.global_gate.bias]
        return [t for g in self.global_gate.values() for t in (g.weight, g.bias)]

    def global_gate_bias(self) -> torch.Tensor:
        if self.variant == "paper":
            return self.global_gate.bias
        return torch.cat([self.global_gate[n].bias for n in self.order])

    def gate_rows(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """([local-gate rows (N); global-gate vectors (N)] (2N, d_in), global-gate biases (N))."""
        v, bias = self.global_vectors(dtype)
        return torch.cat([self.local_gate.weight.to(v.dtype), v]), bias

    def freeze(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "FusedWeights":
        """The frozen inference stack of this layer in `dtype` on `device` (built once; again only for another
        dtype): every expert and both gates, independent of mode and strengths."""
        if self.frozen is None or self.frozen.w1.dtype != dtype:
            with torch.no_grad():
                first, up, ranks = self._expert_stacks(device, dtype, frozen=True)
                rows, global_b = self.gate_rows(torch.promote_types(dtype, torch.float32))
                rows = rows.to(device=device, dtype=dtype)
                pad = -(first.shape[0] + rows.shape[0]) % PAD_TO
                w1 = torch.cat([first, rows] + ([first.new_zeros(pad, self.d_in)] if pad else []))
                self.frozen = FusedWeights(w1, up, self.local_gate.bias.to(device=device, dtype=dtype),
                                           global_b.to(device=device, dtype=dtype), ranks, len(self.order))
        return self.frozen

    def fused(self, settings: GateSettings, device, dtype, span: tuple[int, int] | None = None) \
            -> "FusedWeights | _Fused":
        """The stacked weights for a call in (device, dtype).

        Nothing trains: the frozen stack (freeze), built on first use; if it sits on another device or in another
        dtype (ComfyUI left it offloaded in low-VRAM mode, or a call in another precision), a copy for this call.
        Gates train on frozen experts (stage 3): the expert stacks are cached and the gate rows, a few per expert,
        are their own matmul, so backward computes no weight gradient for the experts' rows and nothing large is
        copied per call. Experts train: everything is rebuilt per call (folded; gate rows only if the mode uses
        gates)."""
        # (plain attribute loops: Module.parameters() walks the module tree, a cost on every call of every layer)
        experts_train = any(e.down.requires_grad or e.up.requires_grad for e in self.experts.values())
        gates_train = self.local_gate.weight.requires_grad or self.local_gate.bias.requires_grad or any(
            p.requires_grad for p in self._global_gate_params())
        if not experts_train and not gates_train:
            self._stacks.clear()                       # training is over: drop its stacks
            f = self.frozen if self.frozen is not None else self.freeze(dtype, device)
            if f.w1.device != torch.device(device) or f.w1.dtype != dtype:
                return f.copy_for(device, dtype)
            return f
        wide = torch.promote_types(dtype, torch.float32)
        if not experts_train:
            key = (torch.device(device), dtype)
            if key not in self._stacks:
                first, up, ranks = self._expert_stacks(device, dtype, frozen=True)
                self._stacks[key] = first, up, ranks, torch.tensor(ranks, device=device), _block_mask(ranks, device,
                                                                                                     dtype)
            first, up, ranks, ranks_t, mask = self._stacks[key]
            lo, hi = span or (0, len(self.order))
            if (lo, hi) != (0, len(self.order)):       # only the active experts' rows (views), and their gates
                a, b = sum(ranks[:lo]), sum(ranks[:hi])
                first, up, mask = first.narrow(0, a, b - a), None if up is None else up.narrow(1, a, b - a), \
                    mask[lo:hi, a:b]
                ranks, ranks_t = ranks[lo:hi], ranks_t[lo:hi]
            gate_w, global_b = self._training_gate_rows(first, up, mask, lo, hi)
            return _Fused(w1=first, up=up, ranks=ranks, rank_total=sum(ranks), n=hi - lo, gate_w=gate_w,
                          local_b=(self.local_gate.bias if hi - lo == len(self.order) else
                                   self.local_gate.bias[lo:hi]).to(device=device, dtype=dtype),
                          global_b=global_b.to(device=device, dtype=dtype), ranks_t=ranks_t)
        else:
            first, up, ranks = self._expert_stacks(device, dtype, frozen=False)
            ranks_t = torch.tensor(ranks, device=device)
            gate_w, global_b = None, self.global_gate_bias()
            if settings.mode != "none":
                rows, global_b = self.gate_rows(wide)
                pad = -(first.shape[0] + rows.shape[0]) % PAD_TO
                first = torch.cat([first, rows.to(device=device, dtype=dtype)]
                                  + ([first.new_zeros(pad, self.d_in)] if pad else []))
        return _Fused(w1=first, up=up, ranks=ranks, rank_total=sum(ranks), n=len(self.order), gate_w=gate_w,
                      local_b=self.local_gate.bias.to(device=device, dtype=dtype),
                      global_b=global_b.to(device=device, dtype=dtype), ranks_t=ranks_t)

    def _training_gate_rows(self, first: torch.Tensor, up: torch.Tensor | None, mask: torch.Tensor, lo: int,
                            hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_rows of experts lo..hi-1 while gates train on frozen experts, folded through the cached expert
        stacks (`first`, `up`: those experts' part) in one or two matmuls (no per-expert cast or product per call):
        official v_i = w_i @ (c_i up_i) @ down_i, i.e. V = (mask * (W @ U)) @ D for low-rank stacks (U = [c_i up_i],
        D = [down_i], mask keeps expert i's own rank block in row i), or v_i = w_i @ dense_i for dense ones."""
        every = hi - lo == len(self.order)
        local = (self.local_gate.weight if every else self.local_gate.weight[lo:hi]).to(first.dtype)
        if self.variant == "paper":
            glob = self.global_gate.weight if every else self.global_gate.weight[lo:hi]
            return torch.cat([local, glob.to(first.dtype)]), \
                self.global_gate.bias if every else self.global_gate.bias[lo:hi]
        names = self.order[lo:hi]
        w = torch.cat([self.global_gate[n].weight for n in names]).to(first.dtype)              # (k, d_out)
        # as column products (outputs k or 1 wide, never d_in: a per-call fold, not a per-token matmul)
        if up is None:
            v = torch.bmm(first.view(len(names), self.d_out, self.d_in).transpose(1, 2), w.unsqueeze(2)).squeeze(2)
        else:
            v = (first.T @ ((w @ up) * mask).T).T
        return torch.cat([local, v]), torch.cat([self.global_gate[n].bias for n in names])

    def _expert_stacks(self, device, dtype, frozen: bool):
        """(first, up, widths): low rank [down_0; down_1; ...] (R, d_in), [c_0 up_0, ...] (d_out, R) and the
        ranks; or, for frozen experts on a layer where that is cheaper, dense [c_0 up_0 down_0; ...]
        (N d_out, d_in), no up, and widths d_out (see dense_pays). The products are taken in fp32 (or `dtype` if
        wider) and cast once."""
        experts = [self.experts[n] for n in self.order]
        ranks = [e.rank for e in experts]
        wide = torch.promote_types(dtype, torch.float32)
        if frozen and dense_pays(self.d_in, self.d_out, len(experts), sum(ranks)):
            dense = torch.cat([(e.up.to(wide) * e.scale) @ e.down.to(wide) for e in experts])
            return dense.to(device=device, dtype=dtype), None, [self.d_out] * len(experts)
        down = torch.cat([e.down for e in experts]).to(device=device, dtype=dtype)
        up = torch.cat([e.up.to(wide) * e.scale for e in experts], dim=1)
        return down, up.to(device=device, dtype=dtype), ranks

    def _apply(self, fn, *args, **kwargs):
        self._stacks.clear()
        return super()._apply(fn, *args, **kwargs)

    # -- the op --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor, settings: GateSettings, record=None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """out = F(X) + sum_i s_i L_i G_i R_i(X), given X and y = F(X).

        x: (B, n, d_in) for a Linear or (B, d_in, H, W) for a 1x1 Conv2d; y: F(X) of matching layout.
        record: optional callable(local (B, n, N) | None, global (B, N) | None, expert names) for the trace.
        rows: optional (B, N) per-row multipliers of the experts in column order (a one-hot row runs one expert
        alone on that row: the batched ensemble pass of EMoE).
        Without active experts y is returned unchanged (bit-exact).
        """
        strengths, names = [settings.strength(n) for n in self.order], list(self.order)
        if not any(strengths):
            return y
        dtype = compute_dtype(x)
        lo, hi = _active_span(strengths)
        # experts at strength 0 on either side of the active ones are not computed: their rows of the one stack are
        # left out of the matmuls (views, no copy), so an ablation's face-only node costs one expert
        narrow = rows is None and hi - lo < len(strengths) and all(strengths[lo:hi])
        f = self.fused(settings, x.device, dtype, (lo, hi) if narrow else None)
        if narrow and f.n != hi - lo:
            if _can_narrow(f):
                f = _narrowed(f, lo, hi)
            else:
                narrow = False
        if narrow:
            strengths, names = strengths[lo:hi], names[lo:hi]
        conv = x.ndim == 4
        if not conv and x.ndim != 3:
            raise MoLEError(f"MoLE layer input must be (B, n, d) or (B, C, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        if conv:  # 1x1 conv: the H*W positions are the tokens; work token-major like a Linear (one copy)
            x = x.to(dtype, memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(b, -1, self.d_in)
        else:
            x = x.to(dtype)
        h = torch.matmul(x, f.w1.T)                                     # (B, n, K)
        hidden = h if h.shape[2] == f.rank_total else h.narrow(2, 0, f.rank_total)   # (a slice costs a copy in backward)
        if settings.dropout and f.up is not None and torch.is_grad_enabled():
            hidden = torch.nn.functional.dropout(hidden, settings.dropout)   # kohya's network_dropout (training)
        # gate logits [local (N), global (N)]: folded into h after the hidden blocks, or their own small matmul
        logits, col = (h, f.rank_total) if f.gate_w is None else (torch.matmul(x, f.gate_w.T), 0)
        coef, local_gate, global_gate = None, None, None
        if settings.local:
            local_gate = torch.sigmoid(logits.narrow(2, col, f.n) + f.local_b)              # (B, n, N)
            coef = local_gate
        if settings.glob:
            global_gate = torch.sigmoid(logits.narrow(2, col + f.n, f.n).mean(dim=1) + f.global_b)   # (B, N)
            coef = global_gate[:, None] if coef is None else coef * global_gate[:, None]
        if any(s != 1.0 for s in strengths):      # strengths and modes act on these small factors, not on weights
            s = torch.tensor(strengths, device=x.device, dtype=dtype)[None, None]         # (1, 1, N)
            coef = s if coef is None else coef * s
        if rows is not None:
            per_row = rows.to(device=x.device, dtype=dtype)[:, None]                     # (B, 1, N)
            coef = per_row if coef is None else coef * per_row
        if coef is not None:
            coef = torch.where(coef.abs() < TINY, 0.0, coef)
        if record is not None:
            active = [i for i, s in enumerate(strengths) if s != 0.0]
            record(None if local_gate is None else local_gate[..., active],
                   None if global_gate is None else global_gate[:, active], [names[i] for i in active])
        inplace = not (torch.is_grad_enabled() and (y.requires_grad or hidden.requires_grad))
        if f.up is None:                     # dense experts: the gated sum of the output blocks is the delta
            delta = self._sum_blocks(hidden, coef, f).reshape(-1, self.d_out)
        else:
            h2 = (hidden if coef is None else self._scale_blocks(hidden, coef, f, inplace)).reshape(-1, f.rank_total)
            delta = None if not conv and dtype == y.dtype else torch.mm(h2, f.up.T)
        if conv:
            delta = delta.view(b, y.shape[2], y.shape[3], self.d_out).permute(0, 3, 1, 2)
            return y.add_(delta) if inplace else y + delta.to(y.dtype)
        y2 = y.reshape(-1, self.d_out)
        if delta is not None:                # dense experts, or fp32 experts on a half-precision layer (round once)
            out = y2.add_(delta) if inplace else y2 + delta.to(y.dtype)
        else:
            out = y2.addmm_(h2, f.up.T) if inplace else torch.addmm(y2, h2, f.up.T)
        return out.view(y.shape)

    @staticmethod
    def _sum_blocks(hidden: torch.Tensor, coef: torch.Tensor | None, f: "_Fused") -> torch.Tensor:
        """sum_i coef[..., i] * block_i of hidden (B, n, N d_out): the dense experts' gated output (B, n, d_out)."""
        blocks = hidden.unflatten(2, (f.n, -1))
        if coef is None:
            return blocks.sum(2)
        delta = blocks[:, :, 0] * coef[:, :, 0:1]
        for i in range(1, f.n):
            delta = delta.addcmul_(blocks[:, :, i], coef[:, :, i:i + 1])
        return delta

    @staticmethod
    def _scale_blocks(hidden: torch.Tensor, coef: torch.Tensor, f: "_Fused", inplace: bool) -> torch.Tensor:
        """hidden (B, n, R) with expert i's r_i columns times coef[..., i]; coef (B, n or 1, N). In place (on the
        first matmul's output, no new buffer) when nothing needs gradients."""
        if len(set(f.ranks)) == 1:  # equal ranks: a broadcast view, no index tensor
            blocks, c = hidden.unflatten(2, (f.n, f.ranks[0])), coef.unsqueeze(3)
            return blocks.mul_(c).flatten(2) if inplace else (blocks * c).flatten(2)
        c = torch.repeat_interleave(coef, f.ranks_t, dim=2, output_size=f.rank_total)
        return hidden.mul_(c) if inplace else hidden * c


def _block_mask(ranks: list[int], device, dtype) -> torch.Tensor:
    """(N, R): row i is 1 on expert i's columns of a stack of ranks `ranks`, 0 elsewhere (dense stacks: unused)."""
    return torch.block_diag(*[torch.ones(1, r) for r in ranks]).to(device=device, dtype=dtype)


def _active_span(strengths: list[float]) -> tuple[int, int]:
    """[lo, hi): from the first to the last expert whose strength is not 0."""
    active = [i for i, s in enumerate(strengths) if s != 0.0]
    return active[0], active[-1] + 1


def _can_narrow(f) -> bool:
    """The stack holds every expert's rows and, folded after them or as rows of their own, both gates' rows."""
    return f.gate_w is not None or f.w1.shape[0] >= f.rank_total + 2 * f.n


def _narrowed(f, lo: int, hi: int) -> "_Fused":
    """The stack of experts lo..hi-1 only: views of their rows of w1 and columns of up, and their gate rows (2 per
    expert, the only copy)."""
    a, b = sum(f.ranks[:lo]), sum(f.ranks[:hi])
    k = hi - lo
    gates, start = (f.gate_w, 0) if f.gate_w is not None else (f.w1, f.rank_total)
    gate_w = torch.cat([gates.narrow(0, start + lo, k), gates.narrow(0, start + f.n + lo, k)])
    return _Fused(w1=f.w1.narrow(0, a, b - a), up=None if f.up is None else f.up.narrow(1, a, b - a),
                  ranks=list(f.ranks[lo:hi]), rank_total=b - a, n=k, local_b=f.local_b[lo:hi],
                  global_b=f.global_b[lo:hi], ranks_t=f.ranks_t[lo:hi], gate_w=gate_w)


class FusedWeights(nn.Module):
    """A layer's frozen inference stack (see the module docstring): w1 = [expert rows; local-gate rows (N);
    global-gate vectors (N); zero pad] (K, d_in), up (d_out, R) or None for dense experts, the gate biases.
    Parameters without gradients, so that a host's model manager moves, offloads and counts them like weights."""

    gate_w = None            # the gate rows are always folded into w1 here

    def __init__(self, w1: torch.Tensor, up: torch.Tensor | None, local_b: torch.Tensor, global_b: torch.Tensor,
                 ranks: list[int], n: int):
        super().__init__()
        self.w1 = nn.Parameter(w1, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False) if up is not None else None
        self.local_b = nn.Parameter(local_b, requires_grad=False)
        self.global_b = nn.Parameter(global_b, requires_grad=False)
        self.ranks, self.rank_total, self.n = list(ranks), sum(ranks), n
        self.register_buffer("ranks_t", torch.tensor(ranks, device=w1.device), persistent=False)

    def copy_for(self, device, dtype) -> "_Fused":
        """This stack in another device/dtype, for one call (ComfyUI's low-VRAM mode streams it like a weight)."""
        def cast(t):
            return None if t is None else t.detach().to(device=device, dtype=dtype, non_blocking=True)
        return _Fused(cast(self.w1), cast(self.up), self.ranks, self.rank_total, self.n, cast(self.local_b),
                      cast(self.global_b), self.ranks_t.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parameters())


@dataclass
class _Fused:
    """A stack built for one call (training, or a copy of FusedWeights on another device/dtype)."""

    w1: torch.Tensor
    up: torch.Tensor | None
    ranks: list[int]
    rank_total: int
    n: int
    local_b: torch.Tensor | None
    global_b: torch.Tensor | None
    ranks_t: torch.Tensor
    gate_w: torch.Tensor | None = None          # gate rows of their own matmul (gates training), else folded in w1
