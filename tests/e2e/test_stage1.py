"""Stage 1 (`train-base`) on the detectable checkpoint: the loss falls, the UNet and (with --train_text_encoder)
the text encoder train while the VAE does not, and the written checkpoint loads in the stock
CheckpointLoaderSimple and samples through the stock nodes; gradient checkpointing changes memory, not results."""
from __future__ import annotations

import pytest
import torch

from comfyui_mole.mole_ops import safetensors_io
from trainer_utils import held_out, make_config, run


def config(detectable, images, out, **kw):
    return make_config(detectable, images, out, "finetune", **{"output_name": "base", "learning_rate": 1e-4, **kw})


@pytest.fixture(scope="module")
def trained(comfy, detectable, train_images, module_tmp):
    out = module_tmp("stage1_out")
    r = run(config(detectable, train_images, out, max_train_steps=12, train_text_encoder=True,
                   learning_rate_te=1e-5, gradient_checkpointing=True, min_snr_gamma=5.0))
    r.precache()
    before = held_out(r)
    r.train()
    after = held_out(r)
    r.stage.detach()
    return out / "base.safetensors", before, after


def test_stage1_lowers_the_loss_and_trains_unet_and_text_encoder(trained, detectable):
    path, before, after = trained
    assert after < 0.8 * before, (before, after)
    new, metadata, _ = safetensors_io.read(path)
    old, _, _ = safetensors_io.read(detectable)
    groups = {"model.diffusion_model.": [], "cond_stage_model.transformer.": [], "first_stage_model.": []}
    for k in new:
        for prefix, changed in groups.items():
            if k.startswith(prefix):
                changed.append(not torch.equal(new[k].float(), old[k].float()))
    assert all(groups.values()) and sum(map(len, groups.values())) == len(new)
    assert sum(groups["model.diffusion_model."]) > 0.9 * len(groups["model.diffusion_model."])
    assert sum(groups["cond_stage_model.transformer."]) > 0.5 * len(groups["cond_stage_model.transformer."])
    assert not any(groups["first_stage_model."]), "the VAE must stay frozen"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1" and metadata["mole.steps"] == "12"
    assert metadata["modelspec.sai_model_spec"] == "1.0.0" and metadata["mole.text_encoder_trained"] == "true"


def test_stage1_checkpoint_loads_in_stock_loader_and_samples(trained, detectable):
    import folder_paths
    import nodes

    path, _, _ = trained
    folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    images = {}
    for name in (detectable.name, path.name):
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(name)
        positive = nodes.CLIPTextEncode().encode(clip, "a red circle on a blue background")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        with torch.inference_mode():
            samples = nodes.common_ksampler(model, 1, 4, 5.0, "euler", "normal", positive, negative, latent)[0]
            images[name] = nodes.VAEDecode().decode(vae, samples)[0]
    trained_image = images[path.name]
    assert trained_image.shape == (1, 64, 64, 3) and torch.isfinite(trained_image).all()
    assert (trained_image - images[detectable.name]).abs().max() > 1e-3, "the fine-tuned weights were not used"


def test_gradient_checkpointing_gives_the_same_step(comfy, detectable, train_images, tmp_path):
    results = []
    for checkpointing in (False, True):
        r = run(config(detectable, train_images, tmp_path / str(checkpointing), max_train_steps=2,
                       train_text_encoder=True, gradient_checkpointing=checkpointing))
        r.train()
        results.append({k: p.detach().clone() for k, p in r.stage.named_trainable().items()})
        r.stage.detach()
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys()
    worst = max((float((plain[k] - checkpointed[k]).abs().max()), k) for k in plain)
    assert worst[0] <= 1e-6, worst


def test_text_encoder_gradient_matches_a_finite_difference(comfy, detectable):
    """ComfyUI's CLIP layers add in place; the trainable forward must give true gradients."""
    from comfyui_mole.trainer.training.model import Base

    base = Base(detectable)
    weight = dict(base.make_text_encoder_trainable().named_parameters())[
        "clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.weight"]
    projection = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))

    def loss():
        return (base.encode_text(["a red circle on a blue background"], (64, 64), grad=True).context
                * projection).sum()

    with torch.enable_grad():
        loss().backward()
    eps, (i, j) = 1e-2, (5, 7)
    with torch.no_grad():
        weight[i, j] += eps
        plus = float(loss())
        weight[i, j] -= 2 * eps
        minus = float(loss())
        weight[i, j] += eps
    assert float(weight.grad[i, j]) == pytest.approx((plus - minus) / (2 * eps), rel=0.02)
