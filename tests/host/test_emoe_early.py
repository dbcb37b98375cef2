"""The early-estimate mode gives the separate pass's score, during a normal generation that it leaves unchanged."""
import torch

from comfyui_mole.mole_ops.emoe import DISAGREEMENT
from host_utils import sample
from mole_fakes import make_mole


def test_early_estimate_equals_separate_score_and_leaves_the_image(tiny):
    from comfyui_mole.nodes.patch import EarlyEstimate, MoLEPatch, attach_early_estimate
    from comfyui_mole.nodes.uncertainty import ExpertEnsemble, score
    from comfyui_mole.mole_ops.ops import GateSettings

    mole, experts = make_mole(tiny, n=3)
    mole.requires_grad_(False)
    estimate = EarlyEstimate(MoLEPatch(mole, GateSettings("none")), 3, DISAGREEMENT)
    watched = attach_early_estimate(tiny, estimate)
    base = sample(tiny, steps=3)
    generated = sample(watched, steps=3)
    assert torch.equal(generated, base)                        # the generation itself is unchanged
    early = estimate.result
    assert early is not None and early.members == 3 and (early.score > 0).all()

    # the separate mode: same first-step input (noise of the same seed at sigma_max), conditional rows
    gen = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 7, 64, generator=gen), {}]]
    latent = torch.zeros(1, 4, 4, 6)
    separate = score(ExpertEnsemble(tiny, tuple(experts)), positive, latent, 0)
    torch.testing.assert_close(early.score, separate.score, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(early.map, separate.map, rtol=1e-4, atol=1e-6)


def test_early_estimate_on_a_mole_model_still_scores_the_members(tiny):
    """With Apply MoLE upstream (gated experts generating), the estimate pass still runs each member alone."""
    from comfyui_mole.mole_ops.ops import GateSettings
    from comfyui_mole.mole_ops.trace import GateTrace
    from comfyui_mole.nodes.patch import EarlyEstimate, MoLEPatch, attach_early_estimate
    from comfyui_mole.nodes.uncertainty import ExpertEnsemble, score
    from host_utils import attach

    mole, experts = make_mole(tiny, n=2)
    mole.requires_grad_(False)
    trace = GateTrace(mole.order)
    generating = attach(tiny, mole, trace=trace)
    estimate = EarlyEstimate(MoLEPatch(mole, GateSettings("none")), 2, DISAGREEMENT)
    with_estimate = sample(attach_early_estimate(generating, estimate), steps=3)
    assert torch.equal(with_estimate, sample(generating, steps=3))
    assert trace.steps() == [0, 1, 2]
    gen = torch.Generator().manual_seed(1)
    separate = score(ExpertEnsemble(tiny, tuple(experts)), [[torch.randn(1, 7, 64, generator=gen), {}]],
                     torch.zeros(1, 4, 4, 6), 0)
    torch.testing.assert_close(estimate.result.score, separate.score, rtol=1e-4, atol=1e-6)
