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


def test_early_estimate_passes_controlnet_to_the_members(tiny):
    """The estimate pass gets the generation's ControlNet residuals (rows taken like every other input): its UNet
    output equals that of the separate scoring pass of the same controlled conditioning, member by member (a
    ControlNet adds its residuals after the mid-block, so the score itself cannot show it; the output can)."""
    from comfyui_mole.mole_ops.emoe import capture
    from comfyui_mole.mole_ops.ops import GateSettings
    from comfyui_mole.nodes.patch import EarlyEstimate, MoLEPatch, attach_early_estimate
    from comfyui_mole.nodes.uncertainty import ExpertEnsemble, score
    from host_utils import conditioning, with_controlnet

    mole, experts = make_mole(tiny, n=2)
    plain_positive, negative = conditioning()
    positive, negative = with_controlnet(tiny, plain_positive, negative)
    estimate = EarlyEstimate(MoLEPatch(mole, GateSettings("none")), 2, DISAGREEMENT)
    watched = attach_early_estimate(tiny, estimate)
    out = tiny.model.diffusion_model.out
    with capture(out, []) as generation:
        generated = sample(watched, steps=3, positive=positive, negative=negative)
    assert torch.equal(generated, sample(tiny, steps=3, positive=positive, negative=negative))
    assert (generated - sample(tiny, steps=3)).abs().max() > 1e-4          # the ControlNet acts
    latent = torch.zeros(1, 4, 4, 6)
    with capture(out, []) as controlled_pass:
        controlled = score(ExpertEnsemble(tiny, tuple(experts)), positive, latent, 0)
    with capture(out, []) as plain_pass:
        score(ExpertEnsemble(tiny, tuple(experts)), plain_positive, latent, 0)
    estimate_pass = generation[0]                       # the first UNet call of the generation: the estimate pass
    assert estimate_pass.shape[0] == 2 and (controlled_pass[0] - plain_pass[0]).abs().max() > 1e-3
    torch.testing.assert_close(estimate_pass, controlled_pass[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(estimate.result.score, controlled.score, rtol=1e-4, atol=1e-6)


def test_each_generation_gets_a_new_estimate(tiny):
    """A new sampling run, not a sigma schedule's identity, starts a new estimate: the same schedule twice with
    another prompt gives that prompt's score."""
    from comfyui_mole.mole_ops.ops import GateSettings
    from comfyui_mole.nodes.patch import EarlyEstimate, MoLEPatch, attach_early_estimate

    mole, _ = make_mole(tiny, n=2)
    estimate = EarlyEstimate(MoLEPatch(mole, GateSettings("none")), 2, DISAGREEMENT)
    watched = attach_early_estimate(tiny, estimate)
    sample(watched, steps=3)
    first = estimate.result
    other = [[torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(9)), {}]]
    sample(watched, steps=3, positive=other)
    assert estimate.result is not first and not torch.equal(estimate.result.score, first.score)
    sample(watched, steps=3)
    torch.testing.assert_close(estimate.result.score, first.score, rtol=0, atol=0)
