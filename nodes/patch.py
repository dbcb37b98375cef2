"""The one place that touches ModelPatcher: attach a MoLE to a clone of a MODEL.

Three things under one key ("mole"): the attachment (the MoLE patch, which owns the tensors), the injection
(forward hooks registered in `inject`, removed in `eject`; modules are resolved from `patcher.model` then, never
captured earlier) and a DIFFUSION_MODEL wrapper that gives the hooks their per-call context (the patch of the
patcher that is sampling, the step, cond/uncond rows). The hooks read that context from a ContextVar rather than
from what `inject` saw: ComfyUI may reuse one loaded model for two clones whose injections have the same key, and
two Apply MoLE nodes on one base must not leak into each other.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch
from comfy.patcher_extension import PatcherInjection, WrappersMP

from ..mole_ops.emoe import capture, capture_module, disagreement, member_rows
from ..mole_ops.hooks import check_modules, run_layer
from ..mole_ops.mixture import MoLE
from ..mole_ops.ops import GateSettings
from ..mole_ops.trace import GateTrace

KEY = "mole"
EMOE_KEY = "mole_emoe"


@dataclass
class MoLEPatch:
    mole: MoLE
    settings: GateSettings = field(default_factory=GateSettings)
    start_percent: float = 0.0
    end_percent: float = 1.0
    trace: GateTrace | None = None
    rows: torch.Tensor | None = None    # per-row expert multipliers (EMoE's batched expert members)


@dataclass
class _Call:
    patch: MoLEPatch
    active: bool
    pinned: bool = False     # an EMoE estimate pass: an inner Apply MoLE wrapper must not replace it


_current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("mole_call", default=None)
_injected: dict[int, tuple[int, list]] = {}   # id(model) -> (injection count, hook handles)


def _hook(key: str):
    def hook(module, args, output):
        call = _current.get()
        if call is None or not call.active or key not in call.patch.mole.kohya_names:
            return output
        patch = call.patch
        return run_layer(key, patch.mole.layer(key), args[0], output, patch.settings, patch.trace, patch.rows)
    return hook


def _inject(patcher) -> None:
    """Hooks on every expert-capable layer of the model, once per module tree however many clones inject:
    they dispatch to the patch of whichever clone is sampling."""
    count, handles = _injected.get(id(patcher.model), (0, []))
    if count == 0:
        patch = patcher.get_attachment(KEY) or patcher.get_attachment(EMOE_KEY).patch
        modules = dict(patcher.model.named_modules())
        handles = [modules[key].register_forward_hook(_hook(key))
                   for key in patch.mole.layout.layer_keys if key in modules]
    _injected[id(patcher.model)] = (count + 1, handles)


def _eject(patcher) -> None:
    count, handles = _injected.pop(id(patcher.model), (0, []))
    if count > 1:
        _injected[id(patcher.model)] = (count - 1, handles)
        return
    for handle in handles:
        handle.remove()


def schedule_position(transformer_options: dict) -> tuple[int, float]:
    """(step index, fraction of the schedule) of the current call, from ComfyUI's sigmas."""
    sample_sigmas = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if sample_sigmas is None or sigmas is None or len(sample_sigmas) < 2:
        return 0, 0.0
    sigma = float(sigmas.reshape(-1)[0])
    step = int((sample_sigmas - sigma).abs().argmin())
    last = len(sample_sigmas) - 2  # the final sigma (0) is never evaluated
    return step, step / max(last, 1)


def _wrapper(patch: MoLEPatch):
    def wrapper(executor, x, *args, **kwargs):
        outer = _current.get()
        if outer is not None and outer.pinned:     # inside an EMoE estimate pass: it decides what runs
            return executor(x, *args, **kwargs)
        transformer_options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        step, position = schedule_position(transformer_options)
        active = patch.start_percent <= position <= patch.end_percent
        trace = patch.trace if active else None
        if trace is not None:
            chunks = transformer_options.get("cond_or_uncond") or [0]
            per = x.shape[0] // len(chunks)
            trace.begin_call(step, tuple(x.shape[-2:]), [k for k in chunks for _ in range(per)])
        token = _current.set(_Call(patch, active))
        try:
            return executor(x, *args, **kwargs)
        finally:
            _current.reset(token)
            if trace is not None:
                trace.end_call()
    return wrapper


def apply_mole(model, patch: MoLEPatch):
    """A clone of `model` (a ModelPatcher) with the MoLE patch attached; `model` itself is unchanged."""
    check_modules(model.model, patch.mole)  # fail at node time, not in the middle of sampling
    clone = model.clone()
    clone.set_attachments(KEY, patch)
    clone.set_injections(KEY, [PatcherInjection(inject=_inject, eject=_eject)])
    clone.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)  # a MoLE applied again replaces the first
    clone.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, _wrapper(patch))
    return clone


@dataclass
class EarlyEstimate:
    """EMoE during a normal generation: at its first step, the conditional rows run once more as one batched pass,
    one copy per expert member (`patch` carries the experts at fixed scale; each copy runs one of them), and the
    disagreement at the capture point is kept in `result` (replaced by every new generation)."""

    patch: MoLEPatch
    members: int
    kind: str
    result: object = None
    _run: int | None = None
    _last_step: int | None = None
    _pending: bool = False


def _estimate_pass(estimate: EarlyEstimate, executor, x, args, options, chunks):
    """The conditional rows once more, repeated per member, each copy with one expert; the disagreement."""
    per = x.shape[0] // len(chunks)
    rows = torch.cat([torch.arange(i * per, (i + 1) * per) for i, k in enumerate(chunks) if k == 0])
    m = estimate.members

    def take(t):
        return None if t is None else t[rows].repeat(m, *([1] * (t.ndim - 1)))
    timesteps, context, y = (args + (None,) * 3)[:3]
    patch = MoLEPatch(estimate.patch.mole, estimate.patch.settings, rows=member_rows(m, len(rows), m, list(range(m))))
    _, point = capture_module(executor.class_obj)
    token = _current.set(_Call(patch, True, pinned=True))
    try:
        with capture(point, []) as seen:
            executor(take(x), take(timesteps), take(context), take(y), None,
                     {**options, "cond_or_uncond": [0] * m})
    finally:
        _current.reset(token)
    return disagreement(seen[0].unflatten(0, (m, len(rows))), estimate.kind)


def _emoe_wrapper(estimate: EarlyEstimate):
    def wrapper(executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        step, _ = schedule_position(options)
        run = id(options.get("sample_sigmas"))
        if step == 0 and (estimate._last_step != 0 or estimate._run != run):
            estimate._pending = True          # a new generation started
        estimate._last_step, estimate._run = step, run
        chunks = options.get("cond_or_uncond") or [0]
        if estimate._pending and step == 0 and 0 in chunks:
            estimate._pending = False
            estimate.result = _estimate_pass(estimate, executor, x, args, options, chunks)
        return executor(x, *args, **kwargs)
    return wrapper


def attach_early_estimate(model, estimate: EarlyEstimate):
    """A clone of `model` that computes `estimate` during the first step of its next generation."""
    check_modules(model.model, estimate.patch.mole)
    clone = model.clone()
    clone.set_attachments(EMOE_KEY, estimate)
    clone.set_injections(EMOE_KEY, [PatcherInjection(inject=_inject, eject=_eject)])
    clone.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, EMOE_KEY)
    clone.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, EMOE_KEY, _emoe_wrapper(estimate))
    return clone
