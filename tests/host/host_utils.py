"""Helpers of the host ring: sampling a MODEL through ComfyUI's own KSampler."""
import torch


def conditioning():
    """(positive, negative) of the tiny model: a random and a zero text encoding."""
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(1, 7, 64, generator=gen), {}]], [[torch.zeros(1, 7, 64), {}]]


def sample(model, seed=0, steps=3, cfg=4.0, width=48, height=32, batch=1, positive=None, negative=None):
    import nodes

    default_positive, default_negative = conditioning()
    positive, negative = positive or default_positive, negative or default_negative
    latent = {"samples": torch.zeros(batch, 4, height // 8, width // 8)}
    with torch.inference_mode():
        return nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def attach(model, mole, **patch):
    """Apply MoLE's patch (MoLEPatch fields: settings, start_percent, end_percent, trace) on a clone of `model`,
    as the Apply MoLE node does."""
    from comfyui_mole.nodes.patch import MoLEPatch, apply_mole

    return apply_mole(model, MoLEPatch(mole, **patch))


def tiny_controlnet(model):
    """A ControlNet of the tiny model's shape with random weights, as ComfyUI's ControlNet object."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    from comfyui_mole.trainer.harness.tiny_models import init_parameters

    config = {k: v for k, v in model.model.model_config.unet_config.items() if k not in ("out_channels",)}
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    control = init_parameters(comfy.cldm.cldm.ControlNet(**config), seed=11)
    return comfy.controlnet.ControlNet(control, load_device=torch.device("cpu"))


def with_controlnet(model, positive, negative, strength=1.0):
    """The conditionings with a tiny ControlNet applied (ComfyUI's Apply ControlNet node) and a fixed hint."""
    import nodes

    hint = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(2))
    return nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, tiny_controlnet(model), hint,
                                                            strength, 0.0, 1.0)
