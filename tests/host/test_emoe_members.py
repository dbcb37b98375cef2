"""EMoE with MoLE experts as members: one batched pass (one member per batch row) equals separate passes."""
import torch

from comfyui_mole.mole_ops.emoe import capture, capture_module, disagreement, member_rows
from comfyui_mole.mole_ops.hooks import HookState, attach
from comfyui_mole.mole_ops.ops import GateSettings
from mole_fakes import make_mole


def test_batched_expert_members_equal_separate_passes(tiny):
    mole, _ = make_mole(tiny, n=3)
    unet = tiny.model.diffusion_model
    _, point = capture_module(unet)
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 4, 6, generator=gen), torch.tensor([700.0, 700.0]), torch.randn(2, 7, 64, generator=gen)

    separate = []
    for name in mole.order:
        only = GateSettings("none", {n: float(n == name) for n in mole.order})
        handles = attach(tiny.model, mole, HookState(only))
        with torch.no_grad(), capture(point, []) as seen:
            unet(x, timesteps=t, context=ctx)
        for h in handles:
            h.remove()
        separate.append(seen[0])
    separate = torch.stack(separate)                                   # (M, B, C, H, W)

    m = len(mole.order)
    handles = attach(tiny.model, mole, HookState(GateSettings("none"), rows=member_rows(m, 2, m, list(range(m)))))
    with torch.no_grad(), capture(point, []) as seen:
        unet(x.repeat(m, 1, 1, 1), timesteps=t.repeat(m), context=ctx.repeat(m, 1, 1))
    for h in handles:
        h.remove()
    batched = seen[0].unflatten(0, (m, 2))
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    assert (separate[0] - separate[1]).abs().max() > 1e-4              # the members really differ
    d = disagreement(batched)
    assert (d.score > 0).all() and d.map.shape == (2,) + batched.shape[-2:]
