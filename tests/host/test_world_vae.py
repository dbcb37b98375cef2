"""The demo world's shipped VAE: it loads, was trained on this world version, reconstructs pictures it never saw
sharply; a short training run and save/load round-trip (its loader's errors: test_world_assets.py)."""
import pytest
import torch

from comfyui_mole.trainer.demo import vae, world


@pytest.fixture(scope="module")
def shipped(comfy):
    return vae.load()


def test_shipped_vae_is_of_this_world_and_sharp(shipped):
    from safetensors import safe_open

    with safe_open(str(vae.SHIPPED), "pt") as f:
        metadata = f.metadata()
    assert metadata["mole.world_version"] == str(world.VERSION)
    # pictures of every kind from a stream neither its training nor the demo uses
    for kind in vae.KINDS:
        assert vae.psnr(shipped, vae.world_pictures(kind, 8, "vae-test")) > 20, kind
    # what the demo reports: the latents, in the model's scale, are roughly standardised
    pixels = vae.world_pictures("scenes", 16, "vae-test")
    latents = shipped.encode(pixels) * vae.SD_LATENT_FACTOR
    assert abs(latents.mean().item()) < 0.3 and 0.6 < latents.std().item() < 1.6


def test_reconstruction_sheet(shipped, tmp_path):
    from PIL import Image

    path = vae.reconstruction_sheet(shipped, tmp_path / "sheet.png", per_row=3, zoom=1)
    with Image.open(path) as im:
        assert im.size == (3 * 64, 6 * 64)


def test_short_training_and_round_trip(comfy, tmp_path):
    pixels = vae.world_pictures("scenes", 4, "vae-test")
    taesd = vae.train_taesd(pixels, steps=3, batch=2)
    assert taesd.vae_scale.item() > 0 and torch.isfinite(taesd.vae_shift)
    path = vae.save(taesd, tmp_path / "v.safetensors", {"mole.world_version": str(world.VERSION)})
    assert not list(tmp_path.glob("*.tmp"))
    again = vae.load(path)
    with torch.no_grad():
        assert torch.allclose(again.encode(pixels), taesd.half().float().encode(pixels), atol=1e-4)
