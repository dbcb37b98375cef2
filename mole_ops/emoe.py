"""EMoE: a zero-shot uncertainty score from the disagreement of an ensemble (SPEC.md section 6).

At the first denoising step, with the same starting noise and the same text encoding, each member (a model, or one
expert on a shared base) produces a feature at a capture point (the UNet mid-block output; models without a middle
block use the last input block). The score is the variance across members per element, averaged over all elements;
the map is that variance averaged over channels. Conditional rows only.

For independently trained members (community fine-tunes of one base) this estimates epistemic uncertainty. For
MoLE's own face and hand experts, two specialists on one base, it is "expert disagreement", not epistemic
uncertainty: they are not independent hypotheses.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import MoLEError

EPISTEMIC = "epistemic uncertainty"
DISAGREEMENT = "expert disagreement"


@dataclass
class Disagreement:
    score: torch.Tensor     # (B,) mean variance per image
    map: torch.Tensor       # (B, H, W) variance averaged over channels
    members: int
    kind: str               # EPISTEMIC or DISAGREEMENT

    def summary(self) -> str:
        scores = ", ".join(f"{s:.4g}" for s in self.score.tolist())
        note = "" if self.kind == EPISTEMIC else (" (two specialists on one base are not independent hypotheses: "
                                                 "read this as how much they disagree, not as epistemic uncertainty)")
        few = " Fewer than 4 members: the estimate is noisy (the paper used 4)." if self.members < 4 else ""
        return f"{self.kind} from {self.members} members: {scores}{note}.{few}"


def disagreement(features: torch.Tensor, kind: str = EPISTEMIC) -> Disagreement:
    """features (M, B, C, H, W), one slice per member -> score (B,) and map (B, H, W).

    Variance is the population variance across the M members (divide by M), per element.
    """
    if features.ndim != 5:
        raise MoLEError(f"features must be (members, batch, C, H, W), got {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise MoLEError("an ensemble needs at least 2 members")
    var = features.float().var(dim=0, unbiased=False)        # (B, C, H, W)
    return Disagreement(var.mean(dim=(1, 2, 3)), var.mean(dim=1), features.shape[0], kind)


def capture_module(unet: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the capture point: the last layer of the mid-block, else of the last input block.

    The layer, not the block: ComfyUI's UNet runs a block's layers one by one and never calls the block itself.
    """
    middle = getattr(unet, "middle_block", None)
    if middle is not None:
        return f"middle_block.{len(middle) - 1}", middle[-1]
    blocks = getattr(unet, "input_blocks", None)
    if not blocks:
        raise MoLEError("this UNet has neither a middle block nor input blocks to read features from")
    return f"input_blocks.{len(blocks) - 1}.{len(blocks[-1]) - 1}", blocks[-1][-1]


@contextmanager
def capture(module: nn.Module, keep: list):
    """Append the output of `module` to `keep` on every call while the context is open."""
    handle = module.register_forward_hook(lambda m, args, out: keep.append(out.detach().float().clone()))
    try:
        yield keep
    finally:
        handle.remove()


def first_call_features(unet: nn.Module, run) -> torch.Tensor:
    """The capture point's output at the first model call that `run()` makes (e.g. a 1-step sampler run)."""
    _, point = capture_module(unet)
    with capture(point, []) as seen:
        run()
    if not seen:
        raise MoLEError("the model was never called: nothing to score")
    return seen[0]


def member_rows(members: int, batch: int, n_experts: int, columns: list[int]) -> torch.Tensor:
    """One-hot expert selection for a batched ensemble pass: rows [m * batch, (m + 1) * batch) use expert
    columns[m] only. Shape (members * batch, n_experts)."""
    if len(columns) != members:
        raise MoLEError(f"{members} members need {members} expert columns, got {columns}")
    rows = torch.zeros(members * batch, n_experts)
    for m, col in enumerate(columns):
        rows[m * batch:(m + 1) * batch, col] = 1.0
    return rows


@dataclass(frozen=True)
class MemberBatch:
    """One batched pass over expert members: the batch is repeated once per expert, and copy m runs expert m
    alone (at fixed scale). `rows` is the per-row expert selection for the op, `repeat` makes the batched input,
    `split` turns the batched output (members * batch, ...) into (members, batch, ...)."""

    members: int
    batch: int

    @property
    def rows(self) -> torch.Tensor:
        return member_rows(self.members, self.batch, self.members, list(range(self.members)))

    def repeat(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat(self.members, *([1] * (t.ndim - 1)))

    def split(self, batched: torch.Tensor) -> torch.Tensor:
        return batched.unflatten(0, (self.members, self.batch))


def first_step_features(model, positive, noise: torch.Tensor, seed: int) -> torch.Tensor:
    """The capture point's output at the first model call of a 1-step euler run of ComfyUI's own sampler, CFG 1
    (conditional rows only): how every EMoE member is scored. `model` is a ModelPatcher; this needs a ComfyUI in
    the process (imported here, on call, so that mole_ops itself stays host-free)."""
    import comfy.sample

    def run():
        with torch.inference_mode():
            comfy.sample.sample(model, noise, 1, 1.0, "euler", "normal", positive, positive, torch.zeros_like(noise),
                                disable_pbar=True, seed=seed)
    return first_call_features(model.model.diffusion_model, run)
