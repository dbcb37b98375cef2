"""The real loader and sampler on the generated checkpoints (the host ring)."""
from pathlib import Path

import torch


def test_host_nodes_module_is_comfyuis(comfy):
    import nodes

    assert Path(nodes.__file__).resolve() == (comfy / "nodes.py").resolve()


def test_detectable_checkpoint_loads_and_samples(detectable):
    import comfy.model_base
    import nodes

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(detectable.name)
    assert isinstance(model.model, comfy.model_base.BaseModel)
    assert type(model.model.model_config).__name__ == "SD15"
    positive = nodes.CLIPTextEncode().encode(clip, "a portrait of a person waving")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(64, 96, 2)[0]
    out = nodes.KSampler().sample(model, 7, 4, 7.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert out.shape == (2, 4, 12, 8)
    assert torch.isfinite(out).all() and out.std() > 0
    image = nodes.VAEDecode().decode(vae, {"samples": out})[0]
    assert image.shape == (2, 96, 64, 3)


def test_tiny_models_have_the_expected_layout(tiny, tiny_sdxl):
    def transformer_count(patcher):
        return sum(1 for name, _ in patcher.model.diffusion_model.named_modules() if name.endswith(".proj_in"))

    n_tiny = sum(p.numel() for p in tiny.model.diffusion_model.parameters())
    assert 0.5e6 < n_tiny < 2e6
    assert transformer_count(tiny) == 7
    assert transformer_count(tiny_sdxl) == 11
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in tiny.model.diffusion_model.parameters()
               if p.numel() > 1)
