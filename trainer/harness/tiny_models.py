"""Small Stable Diffusion models built from configs through ComfyUI's own classes (no downloads).

- `tiny_sd15`: SD1.5 architecture at ~1M parameters, for fast tests of patching and training.
- `tiny_sdxl`: SDXL block layout (the 722 expert layers) at tiny width, for key-mapping tests.
- `full_sd15`: the real-size SD1.5 UNet (860M parameters) with random weights, for benchmarks.
- `write_detectable_checkpoint`: the smallest single-file checkpoint that the stock CheckpointLoaderSimple
  detects as SD1.5 (UNet width 320 and context 768 are what detection keys on; one level, no middle block),
  with a CLIP-L text encoder and a TAESD-shaped VAE.

Every parameter is initialised explicitly: ComfyUI's ops leave weights uninitialised.
Requires `trainer.host.use_comfy()` to have run.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

SD15_BASE = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "use_linear_in_transformer": False, "num_heads": 8, "num_head_channels": -1,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

TINY_SD15 = {
    **SD15_BASE, "model_channels": 32, "context_dim": 64, "num_heads": 2,
    "channel_mult": [1, 2], "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1],
}

FULL_SD15 = {
    **SD15_BASE, "model_channels": 320, "context_dim": 768,
    "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}

# transformer_depth_middle -2 means "no middle block" to ComfyUI's detection.
DETECTABLE_SD15 = {
    **SD15_BASE, "model_channels": 320, "context_dim": 768,
    "channel_mult": [1], "num_res_blocks": [1], "transformer_depth": [1],
    "transformer_depth_middle": -2, "transformer_depth_output": [1, 1],
}

# What SDXL detection keys on (width 320, context 2048, adm 2816, linear proj, depths [0,0,2,2,10,10]) at one
# channel width and without the middle block: 90M UNet parameters instead of 2.6G.
DETECTABLE_SDXL = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": -2,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

TINY_SDXL = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816,
    "model_channels": 32, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_linear_in_transformer": True, "context_dim": 64, "num_head_channels": 16,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


@torch.no_grad()
def init_parameters(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic, non-degenerate init: weights ~ N(0, 1/fan_in), biases ~ 0, norm scales ~ 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            values = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
        elif name.endswith("weight"):  # 1-D weights are norm scales
            values = 1 + torch.randn(p.shape, generator=gen) * 0.02
        elif p.ndim == 0:
            values = torch.ones(()) if name.endswith("scale") else torch.zeros(())
        else:
            values = torch.randn(p.shape, generator=gen) * 0.02
        p.copy_(values.to(p.dtype))
    return module


def _patcher(family: str, config: dict, seed: int, dtype: torch.dtype):
    """A ModelPatcher around comfy.supported_models.<family>(config), every parameter initialised."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, family)(dict(config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    init_parameters(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def tiny_sd15(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around an SD1.5-architecture model of ~1M parameters (context_dim 64)."""
    return _patcher("SD15", TINY_SD15, seed, dtype)


def full_sd15(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around the full-size SD1.5 UNet with random weights (860M parameters)."""
    return _patcher("SD15", FULL_SD15, seed, dtype)


def tiny_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a tiny-width model with SDXL's block layout (its 722 expert layers)."""
    return _patcher("SDXL", TINY_SDXL, seed, dtype)


DETECTABLE = {"SD15": DETECTABLE_SD15, "SDXL": DETECTABLE_SDXL}
ARCHITECTURES = {"SD15": "stable-diffusion-v1", "SDXL": "stable-diffusion-xl-v1-base"}


def detectable_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16, family: str = "SD15",
                          vae: torch.nn.Module | None = None,
                          unet: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """State dict of the smallest checkpoint the stock loader detects as `family` (SD15: UNet, CLIP-L, TAESD;
    SDXL: UNet, CLIP-L + CLIP-G (full size, 820M), TAESD), in the single-file checkpoint's key names: the UNet's
    weights from `seed`, the text encoder's from `seed + 1`. `vae`: a trained TAESD module to use instead of a
    random one; `unet`: trained UNet weights (`model.diffusion_model.*`) instead of random ones."""
    import comfy.supported_models
    import comfy.taesd.taesd

    model_config = getattr(comfy.supported_models, family)(dict(DETECTABLE[family]))
    clip = model_config.clip_target().clip(device="cpu", dtype=torch.float32)
    init_parameters(clip, seed + 1)
    state = {}
    if unet is None:
        unet_module = init_parameters(model_config.get_model({}).diffusion_model, seed)
        state.update({"model.diffusion_model." + k: v for k, v in unet_module.state_dict().items()})
    else:
        state.update(unet)
    state.update(model_config.process_clip_state_dict_for_saving(clip.state_dict()))
    if vae is None:
        vae = init_parameters(comfy.taesd.taesd.TAESD(), seed + 2)
    state.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    return {k: v.detach().to(dtype).contiguous() for k, v in state.items()}


def write_detectable_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16,
                                family: str = "SD15", vae: torch.nn.Module | None = None,
                                unet: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the detectable checkpoint as safetensors (temp file + rename); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(detectable_state_dict(seed, dtype, family, vae, unet), str(tmp),
              metadata={"modelspec.architecture": ARCHITECTURES[family]})
    tmp.replace(path)
    return path


def unet_shapes(family: str, config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of a `family` UNet built from `config` (default: the detectable one)."""
    import comfy.supported_models

    unet = getattr(comfy.supported_models, family)(dict(config or DETECTABLE[family])).get_model({}).diffusion_model
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def layer_shapes(family: str, config: dict | None = None) -> dict[str, tuple[int, int, bool]]:
    """{layer key: (d_in, d_out, is 1x1 conv)} of the expert layers of a `family` UNet built from `config`
    (default: the detectable one)."""
    import comfy.supported_models

    from ...mole_ops.layout import UNetLayout

    config = dict(config or DETECTABLE[family])
    modules = dict(getattr(comfy.supported_models, family)(config).get_model({}).named_modules())
    return {k: (modules[k].weight.shape[1], modules[k].weight.shape[0], modules[k].weight.ndim == 4)
            for k in UNetLayout.from_unet_config(config).layer_keys}


def stand_in_experts(shapes: dict[str, tuple[int, int, bool]], names=("face", "hand"), rank: int = 8,
                     seed: int = 0, scale: float = 0.1):
    """Untrained experts (random down and up, kohya SGM names) and gates for layers of these shapes: stand-ins
    that change the image visibly, for tests and the demo before anything is trained. Returns (experts, gates)."""
    from ...mole_ops.expert_file import ExpertFile, LoRAWeights
    from ...mole_ops.gate_file import GateFile, GateWeights
    from ...mole_ops.layout import PREFIX, kohya_name
    from ...mole_ops.mixture import expert_info

    experts = []
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed + i)
        layers = {kohya_name(key[len(PREFIX):]): LoRAWeights(
            torch.randn(rank, d_in, generator=gen) * scale, torch.randn(d_out, rank, generator=gen) * scale,
            float(rank), conv) for key, (d_in, d_out, conv) in shapes.items()}
        experts.append(ExpertFile(name, layers))
    gen = torch.Generator().manual_seed(seed + 1000)
    n = len(names)
    gates = {kname: GateWeights(torch.randn(n, w.down.shape[1], generator=gen), torch.randn(n, generator=gen),
                                torch.randn(n, w.up.shape[0], generator=gen), torch.randn(n, generator=gen))
             for kname, w in experts[0].layers.items()}
    return experts, GateFile("official", tuple(names), gates, expert_info(experts))


def write_stand_in_files(family: str, paths: dict[str, Path], rank: int = 8, seed: int = 0):
    """Write stand-in experts and gates for the detectable `family` checkpoint to paths {role: path, "gates":
    path} (roles in order); returns (experts, gates) with the files' hashes filled in."""
    from ...mole_ops import expert_file, gate_file
    from ...mole_ops.mixture import expert_info

    roles = [r for r in paths if r != "gates"]
    experts, gates = stand_in_experts(layer_shapes(family), roles, rank, seed)
    for e in experts:
        e.sha256 = expert_file.save(paths[e.name], e, family="SDXL" if family == "SDXL" else "SD1.5")
        e.path = str(paths[e.name])
    gates.expert_info = expert_info(experts)
    gate_file.save(paths["gates"], gates)
    gates.path = str(paths["gates"])
    return experts, gates
