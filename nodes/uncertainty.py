"""EMoE nodes: an ensemble of models (or of MoLE experts on one base) and its first-step disagreement score.

Each member runs ComfyUI's own sampler for one step (its first model call) from the same noise and conditioning,
CFG 1 (conditional rows only), while the capture point's output is kept (mole_ops.emoe).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.sample
import torch
from comfy_api.latest import io

from ..mole_ops.emoe import DISAGREEMENT, EPISTEMIC, MemberBatch, disagreement, first_step_features
from ..mole_ops.errors import MismatchError
from ..mole_ops.mixture import shared
from ..mole_ops.ops import GateSettings
from ..mole_ops.viz import heat
from .apply import model_layout
from .patch import EarlyEstimate, MoLEPatch, apply_mole, attach_early_estimate
from .report import caught_warnings, node_ui
from .types import Ensemble, Estimate, Experts

log = logging.getLogger("mole")


@dataclass
class ModelEnsemble:
    """Members as MODELs of one architecture (independent fine-tunes: epistemic uncertainty)."""

    models: list
    kind: str = EPISTEMIC


@dataclass
class ExpertEnsemble:
    """Members as experts on one base, run as one batched pass (expert disagreement)."""

    model: object
    experts: tuple
    kind: str = DISAGREEMENT


def score(ensemble, positive, latent: torch.Tensor, seed: int):
    noise = comfy.sample.prepare_noise(latent, seed)
    if isinstance(ensemble, ModelEnsemble):
        features = torch.stack([first_step_features(m, positive, noise, seed) for m in ensemble.models])
    else:
        mole = shared(list(ensemble.experts), None, model_layout(ensemble.model))
        members = MemberBatch(len(mole.order), noise.shape[0])
        patch = MoLEPatch(mole, GateSettings("none"), rows=members.rows)
        features = members.split(first_step_features(apply_mole(ensemble.model, patch), positive,
                                                     members.repeat(noise), seed))
    return disagreement(features, ensemble.kind)


class EnsembleFromModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        models = [io.Model.Input(f"model_{i}", optional=i > 2, tooltip=f"Member {i}: a model of the same "
                                 "architecture (e.g. a community fine-tune of the same base).") for i in range(1, 7)]
        return io.Schema(
            node_id="MoLE_EnsembleFromModels", display_name="MoLE Uncertainty Ensemble (models)", category="MoLE",
            description="An ensemble of 2-6 independently trained models for the EMoE uncertainty score "
                        "(the paper used 4 members).",
            inputs=models, outputs=[Ensemble.Output(display_name="ensemble")])

    @classmethod
    def execute(cls, model_1, model_2, **more) -> io.NodeOutput:
        models = [model_1, model_2] + [more[f"model_{i}"] for i in range(3, 7) if more.get(f"model_{i}") is not None]
        kinds = {type(m.model.model_config).__name__ for m in models}
        if len(kinds) > 1:
            raise MismatchError(f"ensemble members must share one architecture, got {sorted(kinds)}")
        with caught_warnings() as warnings:
            if len(models) < 4:
                log.warning("MoLE: an ensemble of %d members gives a noisy estimate; the paper used 4", len(models))
        _, ui = node_ui([f"ensemble of {len(models)} models"], warnings)
        return io.NodeOutput(ModelEnsemble(models), ui=ui)


class EnsembleFromExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_EnsembleFromExperts", display_name="MoLE Expert Ensemble", category="MoLE",
            description="MoLE's experts on their base as ensemble members, one batched pass. The score is expert "
                        "disagreement: two specialists on one base are not independent hypotheses.",
            inputs=[io.Model.Input("model", tooltip="The base the experts were trained on."),
                    Experts.Input("experts", tooltip="Two or more experts (Load MoLE Experts).")],
            outputs=[Ensemble.Output(display_name="ensemble")])

    @classmethod
    def execute(cls, model, experts) -> io.NodeOutput:
        if len(experts) < 2:
            raise MismatchError("an expert ensemble needs at least 2 experts")
        return io.NodeOutput(ExpertEnsemble(model, tuple(experts)))


def _outputs(result):
    m = result.map
    scaled = m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    image = torch.nn.functional.interpolate(heat(scaled).movedim(-1, 1), scale_factor=8, mode="nearest")
    summary = result.summary()
    return io.NodeOutput(float(result.score.mean()), image.movedim(1, -1), summary,
                         ui=node_ui(summary.splitlines(), [])[1])


class UncertaintyScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_UncertaintyScore", display_name="MoLE Uncertainty Score", category="MoLE",
            is_output_node=True,
            description="EMoE: how much the members disagree at the first denoising step (same noise, same "
                        "prompt), read at the UNet mid-block. Higher = the prompt lies where the members were not "
                        "trained together.",
            inputs=[Ensemble.Input("ensemble", tooltip="From an ensemble node."),
                    io.Conditioning.Input("positive", tooltip="The prompt to score."),
                    io.Latent.Input("latent", tooltip="Its size and batch fix the noise shape."),
                    io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True,
                                 tooltip="Seed of the shared starting noise.")],
            outputs=[io.Float.Output(display_name="score"), io.Image.Output(display_name="map"),
                     io.String.Output(display_name="summary")])

    @classmethod
    def execute(cls, ensemble, positive, latent, seed) -> io.NodeOutput:
        return _outputs(score(ensemble, positive, latent["samples"], seed))


class EarlyEstimateModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_UncertaintyEarlyEstimate", display_name="MoLE Uncertainty Early Estimate",
            category="MoLE",
            description="Compute the expert ensemble's disagreement during the first step of the normal generation "
                        "of this model (one extra batched pass of the conditional rows), instead of a separate run.",
            inputs=[io.Model.Input("model", tooltip="The model that generates (with or without Apply MoLE); the "
                                   "experts must fit its base."),
                    Ensemble.Input("ensemble", tooltip="An expert ensemble (MoLE Expert Ensemble).")],
            outputs=[io.Model.Output(display_name="model"), Estimate.Output(display_name="estimate")])

    @classmethod
    def execute(cls, model, ensemble) -> io.NodeOutput:
        if not isinstance(ensemble, ExpertEnsemble):
            raise MismatchError("the early estimate runs expert members inside the generating model; for an "
                                "ensemble of separate models use MoLE Uncertainty Score")
        mole = shared(list(ensemble.experts), None, model_layout(model))
        estimate = EarlyEstimate(MoLEPatch(mole, GateSettings("none")), len(mole.order), ensemble.kind)
        return io.NodeOutput(attach_early_estimate(model, estimate), estimate)


class UncertaintyReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_UncertaintyReport", display_name="MoLE Uncertainty Report", category="MoLE",
            is_output_node=True,
            description="The score an early estimate computed during the generation.",
            inputs=[Estimate.Input("estimate", tooltip="From MoLE Uncertainty Early Estimate."),
                    io.Image.Input("images", tooltip="The decoded images of that generation (orders this node "
                                   "after the sampler).")],
            outputs=[io.Float.Output(display_name="score"), io.Image.Output(display_name="map"),
                     io.String.Output(display_name="summary")])

    @classmethod
    def execute(cls, estimate, images) -> io.NodeOutput:
        if estimate.result is None:
            raise MismatchError("no estimate yet: the sampler did not run with this model (a cached result?); "
                                "change the seed and queue again")
        return _outputs(estimate.result)
