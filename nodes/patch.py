"""The one place that touches ModelPatcher: attach a MoLE (or an EMoE early estimate) to a clone of a MODEL.

Under one key ("mole"; "mole_emoe" for the estimate) a clone gets:
- the attachment, which owns the tensors (`MoLEPatch`, or `EarlyEstimate`);
- the MoLE's frozen stacks as an additional model (a ModelPatcher of their own, one per MoLE, in the dtype the op
  computes in on ComfyUI's device): ComfyUI loads them with the model, counts them in its memory budget, leaves
  them on the offload device when low-VRAM mode has no room (the op then streams them per layer), and offloads
  them when it unloads the model;
- the injection: forward hooks registered in `inject` and removed in `eject`, resolved from `patcher.model` then,
  never captured earlier; one set of hooks per module tree however many clones inject;
- an OUTER_SAMPLE wrapper, which marks the start of a sampling run and names the patcher being sampled, and a
  DIFFUSION_MODEL wrapper, which gives the hooks their per-call context (that patcher's own attachment, the step,
  the cond/uncond rows).
The hooks read that context from ContextVars rather than from what `inject` saw: ComfyUI may reuse one loaded
model for two clones whose injections have the same key, and two Apply MoLE nodes on one base must not leak into
each other. Wrappers look their attachment up on the patcher that is sampling, so a clone's own attachment (see
`MoLEPatch.on_model_patcher_clone`) is the one that acts.

A UNet call outside any sampling run (a node that calls the loaded MoLE model's `apply_model` itself) has no such
context: there the patch of the clone whose injection is in the model acts (ComfyUI ejects a clone's injections
before it loads another clone of the same model, so that is the loaded one), at every call (there is no schedule
to place a step range in) and without recording a trace.
"""
from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass, field, replace

import comfy.model_management
import torch
from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import PatcherInjection, WrappersMP

from ..mole_ops.emoe import MemberBatch, capture, capture_module, disagreement
from ..mole_ops.hooks import check_modules, run_layer
from ..mole_ops.mixture import MoLE
from ..mole_ops.ops import GateSettings, compute_dtype_for
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

    def on_model_patcher_clone(self) -> "MoLEPatch":
        """ModelPatcher.clone() calls this: the clone records into a fork of the trace (its runs also reach the
        trace Apply MoLE returned, and clones never see each other's runs); the tensors are shared, not copied."""
        return replace(self, trace=self.trace.fork() if self.trace is not None else None)


@dataclass
class EarlyEstimate:
    """EMoE during a normal generation: at its first step, the conditional rows run once more as one batched pass,
    one copy per expert member (`patch` carries the experts at fixed scale; each copy runs one of them), and the
    disagreement at the capture point is kept in `result` (replaced by every new generation). Clones share it:
    the Report node reads the estimate it was given, whichever clone of the model generated."""

    patch: MoLEPatch
    members: int
    kind: str
    result: object = None
    pending: bool = False      # a sampling run started and its estimate is not computed yet


@dataclass
class _Call:
    patch: MoLEPatch
    active: bool
    pinned: bool = False     # an EMoE estimate pass: an inner Apply MoLE wrapper must not replace it


_sampling: contextvars.ContextVar[object | None] = contextvars.ContextVar("mole_sampling", default=None)
_current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("mole_call", default=None)
_injected: dict[int, tuple[int, list]] = {}   # id(model) -> (injection count, hook handles)
_owners: dict[int, weakref.ref] = {}           # id(model) -> the clone whose injection is in it (direct calls)


def _direct_call(root: int) -> _Call | None:
    """A UNet call outside any sampling run: the loaded clone's MoLE patch, without its trace (see above)."""
    owner = _owners.get(root)
    patcher = owner() if owner is not None else None
    patch = patcher.get_attachment(KEY) if patcher is not None else None
    if patch is None:
        return None
    return _Call(patch if patch.trace is None else replace(patch, trace=None), True)


def _hook(key: str, root: int):
    def hook(module, args, output):
        call = _current.get()
        if call is None and _sampling.get() is None:
            call = _direct_call(root)
        if call is None or not call.active or key not in call.patch.mole.kohya_names:
            return output
        patch = call.patch
        return run_layer(key, patch.mole.layer(key), args[0], output, patch.settings, patch.trace, patch.rows)
    return hook


def _mole_of(patcher) -> MoLE:
    patch = patcher.get_attachment(KEY) or patcher.get_attachment(EMOE_KEY).patch
    return patch.mole


def _inject(patcher) -> None:
    """Hooks on every expert-capable layer of the model, once per module tree however many clones inject:
    they dispatch to the patch of whichever clone is sampling."""
    root = id(patcher.model)
    count, handles = _injected.get(root, (0, []))
    if count == 0:
        modules = dict(patcher.model.named_modules())
        handles = [modules[key].register_forward_hook(_hook(key, root))
                   for key in _mole_of(patcher).layout.layer_keys if key in modules]
    _injected[root] = (count + 1, handles)
    if patcher.get_attachment(KEY) is not None:
        _owners[root] = weakref.ref(patcher)


def _eject(patcher) -> None:
    count, handles = _injected.pop(id(patcher.model), (0, []))
    if count > 1:
        _injected[id(patcher.model)] = (count - 1, handles)
        return
    _owners.pop(id(patcher.model), None)
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


def _sampling_run(executor, *args, **kwargs):
    """OUTER_SAMPLE: one sampling run of the guider's model; its attachments act in the calls below. A new run
    of an early-estimate model owes a new estimate."""
    patcher = getattr(executor.class_obj, "model_patcher", None)      # a CFGGuider or a guider derived from it
    estimate = patcher.get_attachment(EMOE_KEY) if patcher is not None else None
    if estimate is not None:
        estimate.pending = True
    token = _sampling.set(patcher)
    try:
        return executor(*args, **kwargs)
    finally:
        _sampling.reset(token)


def _row_kinds(x: torch.Tensor, transformer_options: dict) -> list[int]:
    chunks = transformer_options.get("cond_or_uncond") or [0]
    per = x.shape[0] // len(chunks)
    return [k for k in chunks for _ in range(per)]


def _mole_call(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
    """DIFFUSION_MODEL: one UNet call with the sampled patcher's MoLE patch, active inside its schedule range."""
    transformer_options = transformer_options if transformer_options is not None else {}
    args = (x, timesteps, context, y, control, transformer_options)
    outer, patcher = _current.get(), _sampling.get()
    patch = patcher.get_attachment(KEY) if patcher is not None else None
    if (outer is not None and outer.pinned) or patch is None:   # an estimate pass decides; or not our run
        return executor(*args, **kwargs)
    step, position = schedule_position(transformer_options)
    active = patch.start_percent <= position <= patch.end_percent
    trace = patch.trace if active else None
    if trace is not None:
        trace.begin_call(step, tuple(x.shape[-2:]), _row_kinds(x, transformer_options))
    token = _current.set(_Call(patch, active))
    try:
        return executor(*args, **kwargs)
    finally:
        _current.reset(token)
        if trace is not None:
            trace.end_call()


def _estimate_call(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options=None,
                   **kwargs):
    """DIFFUSION_MODEL: the first call of a run that holds conditional rows computes the early estimate first."""
    transformer_options = transformer_options if transformer_options is not None else {}
    patcher = _sampling.get()
    estimate = patcher.get_attachment(EMOE_KEY) if patcher is not None else None
    if estimate is not None and estimate.pending and 0 in (transformer_options.get("cond_or_uncond") or [0]):
        estimate.pending = False
        estimate.result = _estimate_pass(estimate, executor, x, timesteps, context, y, control, transformer_options,
                                         kwargs)
    return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def _estimate_pass(estimate: EarlyEstimate, executor, x, timesteps, context, y, control, options, kwargs):
    """The conditional rows once more, repeated per member, each copy with one expert; the disagreement. Every
    per-row input goes along (timesteps, text, y, ControlNet residuals, extra conditions)."""
    kinds = _row_kinds(x, options)
    rows = torch.tensor([i for i, k in enumerate(kinds) if k == 0])
    members = MemberBatch(estimate.members, len(rows))

    def take(t):
        if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == x.shape[0]:
            return members.repeat(t[rows.to(t.device)])
        return t

    if control is not None:
        control = {name: [take(t) for t in outputs] for name, outputs in control.items()}
    patch = MoLEPatch(estimate.patch.mole, estimate.patch.settings, rows=members.rows)
    _, point = capture_module(executor.class_obj)
    token = _current.set(_Call(patch, True, pinned=True))
    try:
        with capture(point, []) as seen:
            executor(take(x), take(timesteps), take(context), take(y), control,
                     {**options, "cond_or_uncond": [0] * estimate.members}, **{k: take(v) for k, v in kwargs.items()})
    finally:
        _current.reset(token)
    return disagreement(members.split(seen[0]), estimate.kind)


_stack_patchers: "weakref.WeakKeyDictionary[MoLE, ModelPatcher]" = weakref.WeakKeyDictionary()


def stack_patcher(model, mole: MoLE) -> ModelPatcher:
    """The MoLE's frozen stacks as a model of ComfyUI's memory management: one per MoLE (every Apply MoLE on the
    same files shares it), built on the offload device in the dtype the op computes in for this model's
    activations on the load device (fp16/bf16 on GPUs, fp32 on a CPU without half units)."""
    device = comfy.model_management.get_torch_device()
    activations = model.model.manual_cast_dtype or model.model.get_dtype()
    dtype = compute_dtype_for(device, activations)
    patcher = _stack_patchers.get(mole)
    if patcher is None or next(patcher.model.parameters()).dtype != dtype:
        offload = comfy.model_management.unet_offload_device()
        patcher = ModelPatcher(mole.freeze(dtype, offload), load_device=device, offload_device=offload)
        _stack_patchers[mole] = patcher
    return patcher


def _attach(model, key: str, attachment, mole: MoLE, call_wrapper):
    """A clone of `model` with `attachment` under `key`: the attachment, the hooks' injection, and the two
    wrappers. Fails at node time (not in the middle of sampling) when the MoLE does not fit the model."""
    check_modules(model.model, mole)
    clone = model.clone()
    clone.set_attachments(key, attachment)
    clone.set_additional_models(key, [stack_patcher(model, mole)])
    clone.set_injections(key, [PatcherInjection(inject=_inject, eject=_eject)])
    for kind, wrapper in ((WrappersMP.OUTER_SAMPLE, _sampling_run), (WrappersMP.DIFFUSION_MODEL, call_wrapper)):
        clone.remove_wrappers_with_key(kind, key)     # attached again under the same key: replaces the first
        clone.add_wrapper_with_key(kind, key, wrapper)
    return clone


def apply_mole(model, patch: MoLEPatch):
    """A clone of `model` (a ModelPatcher) with the MoLE patch attached; `model` itself is unchanged."""
    return _attach(model, KEY, patch, patch.mole, _mole_call)


def attach_early_estimate(model, estimate: EarlyEstimate):
    """A clone of `model` that computes `estimate` during the first step of each of its generations."""
    return _attach(model, EMOE_KEY, estimate, estimate.patch.mole, _estimate_call)
