"""Generated experts and gates with the real shapes of a UNet layout (no weights are downloaded)."""
from __future__ import annotations

import torch

from comfyui_mole.mole_ops.expert_file import ExpertFile, LoRAWeights
from comfyui_mole.mole_ops.gate_file import GateFile, GateWeights
from comfyui_mole.mole_ops.layout import PREFIX, UNetLayout
from comfyui_mole.mole_ops.mixture import build

SD15_DIMS = dict(model_channels=320, channel_mult=(1, 2, 4, 4), context_dim=768)
SDXL_DIMS = dict(model_channels=320, channel_mult=(1, 2, 4), context_dim=2048)


def layer_shapes(layout: UNetLayout, model_channels, channel_mult, context_dim) -> dict[str, tuple[int, int, bool]]:
    """{layer key: (d_in, d_out, is 1x1 conv)} of the target modules of a layout."""
    conv_proj = layout.name == "SD1.5"
    out = {}
    for sgm, diffusers, depth in layout.transformers():
        kind, level = diffusers.split(".")[:2]
        if kind == "down_blocks":
            mult = channel_mult[int(level)]
        elif kind == "up_blocks":
            mult = channel_mult[len(channel_mult) - 1 - int(level)]
        else:
            mult = channel_mult[-1]
        c = model_channels * mult
        for key in layout.layer_keys:
            if not key.startswith(f"{PREFIX}{sgm}."):
                continue
            if key.endswith(("proj_in", "proj_out")):
                out[key] = (c, c, conv_proj)
            elif key.endswith(("attn2.to_k", "attn2.to_v")):
                out[key] = (context_dim, c, False)
            elif key.endswith("ff.net.0.proj"):
                out[key] = (c, 8 * c, False)
            elif key.endswith("ff.net.2"):
                out[key] = (4 * c, c, False)
            else:
                out[key] = (c, c, False)
    return out


def fake_expert(name, shapes, rank=4, alpha=2.0, naming="sgm", layout=None, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    diffusers = layout.paths if layout is not None else {}
    for key, (d_in, d_out, conv) in shapes.items():
        path = diffusers[key] if naming == "diffusers" else key[len(PREFIX):]
        kname = key if naming == "diffusion_model" else "lora_unet_" + path.replace(".", "_")
        layers[kname] = LoRAWeights((torch.randn(rank, d_in, generator=gen) * 0.1).to(dtype),
                                    (torch.randn(d_out, rank, generator=gen) * 0.1).to(dtype), alpha, conv)
    return ExpertFile(name, layers)


def fake_gates(experts, variant="official", seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    n = len(experts)
    layers = {}
    for kname, w in experts[0].layers.items():
        d_in, d_out = w.down.shape[1], w.up.shape[0]
        g_in = d_out if variant == "official" else d_in
        layers[kname] = GateWeights(*(t.to(dtype) for t in (
            torch.randn(n, d_in, generator=gen), torch.randn(n, generator=gen),
            torch.randn(n, g_in, generator=gen), torch.randn(n, generator=gen))))
    return GateFile(variant, tuple(e.name for e in experts), layers)


def make_mole(patcher, seed=0, n=2):
    """A MoLE with generated experts and gates for the model inside a ModelPatcher (any SD-family layout)."""
    layout = UNetLayout.from_unet_config(patcher.model.model_config.unet_config)
    modules = dict(patcher.model.named_modules())
    shapes = {}
    for key in layout.layer_keys:
        w = modules[key].weight
        shapes[key] = (w.shape[1], w.shape[0], w.ndim == 4)
    experts = [fake_expert(name, shapes, rank=4, alpha=4.0, naming="sgm", seed=seed + i)
               for i, name in enumerate(["face", "hand", "feet"][:n])]
    return build(experts, fake_gates(experts, seed=seed), layout), experts
