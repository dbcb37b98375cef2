"""Helpers of the host ring: sampling a MODEL through ComfyUI's own KSampler."""
import torch


def sample(model, seed=0, steps=3, cfg=4.0, width=48, height=32, batch=1):
    import nodes

    gen = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 7, 64, generator=gen), {}]]
    negative = [[torch.zeros(1, 7, 64), {}]]
    latent = {"samples": torch.zeros(batch, 4, height // 8, width // 8)}
    with torch.inference_mode():
        return nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def attach(model, mole, **patch):
    """Apply MoLE's patch (MoLEPatch fields: settings, start_percent, end_percent, trace) on a clone of `model`,
    as the Apply MoLE node does."""
    from comfyui_mole.nodes.patch import MoLEPatch, apply_mole

    return apply_mole(model, MoLEPatch(mole, **patch))
