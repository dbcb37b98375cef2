"""The demo world's shipped VAE: it loads, was trained on this world version, reconstructs pictures it never saw
sharply; its loader names the file and what is wrong; a short training run and save/load round-trip."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_mole.mole_ops.errors import MoLEError
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


def test_loader_errors_name_the_file_and_the_problem(comfy, tmp_path):
    with pytest.raises(MoLEError, match="missing; `python -m trainer world-vae`"):
        vae.load(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MoLEError, match="junk.safetensors: not a readable safetensors file"):
        vae.load(tmp_path / "junk.safetensors")
    tensors = load_file(str(vae.SHIPPED))
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"mole.world_version": "2"})
    with pytest.raises(MoLEError, match=f"old.safetensors: trained on world version 2, the world is version "
                                        f"{world.VERSION}"):
        vae.load(tmp_path / "old.safetensors")
    del tensors["taesd_decoder.1.weight"]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata={"mole.world_version": str(world.VERSION)})
    with pytest.raises(MoLEError, match=r"cut.safetensors: not a TAESD state dict \(key 'taesd_decoder.1.weight'"):
        vae.load(tmp_path / "cut.safetensors")


def test_short_training_and_round_trip(comfy, tmp_path):
    pixels = vae.world_pictures("scenes", 4, "vae-test")
    taesd = vae.train_taesd(pixels, steps=3, batch=2)
    assert taesd.vae_scale.item() > 0 and torch.isfinite(taesd.vae_shift)
    path = vae.save(taesd, tmp_path / "v.safetensors", {"mole.world_version": str(world.VERSION)})
    assert not list(tmp_path.glob("*.tmp"))
    again = vae.load(path)
    with torch.no_grad():
        assert torch.allclose(again.encode(pixels), taesd.half().float().encode(pixels), atol=1e-4)
