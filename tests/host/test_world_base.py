"""The demo world's shipped base: it is of this world, the stock loader detects the checkpoint it makes, its text
encoder regenerates bit for bit, and it draws people from noise (judged by the shipped judge); its loader names
the file, the key and the fix."""
import random

import pytest
import torch
from safetensors.torch import save_file

from comfyui_mole.mole_ops.errors import MoLEError
from comfyui_mole.trainer.demo import judge, world, world_base


@pytest.fixture(scope="module")
def checkpoint(comfy, module_tmp):
    return world_base.write_checkpoint(module_tmp("world_base") / "base.safetensors")


def test_shipped_base_is_small_fp16_and_of_this_world(comfy):
    tensors, metadata = world_base.load()
    assert metadata["mole.world_version"] == str(world.VERSION)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert world_base.SHIPPED.stat().st_size < 50 * 2 ** 20
    assert sum(v.numel() for v in tensors.values()) < 25_000_000


def test_the_checkpoint_is_detected_as_sd15_and_draws_people(checkpoint):
    """Eight samples at the demo's size and sampler settings (DDIM, its steps and CFG, empty negative prompt): the
    judge finds a person with a face and a hand in most of them."""
    from comfyui_mole.trainer.demo.pipeline import FULL
    from comfyui_mole.trainer.training import samples
    from comfyui_mole.trainer.training.model import Base

    base = Base(checkpoint)
    assert base.family == "SD1.5"
    prompts = [world.scene(random.Random(f"base-test:{i}")).caption for i in range(8)]
    pictures = torch.cat([samples.generate(base, samples.SamplePrompt(p, width=64, height=64, seed=i, cfg=FULL.cfg,
                                                                      steps=FULL.sample_steps), "ddim", "ddim_uniform")
                          for i, p in enumerate(prompts)])
    verdicts = judge.load().judge(pictures.movedim(-1, 1))
    assert sum(v.scores()["all_found"] for v in verdicts) >= 6, [v.scores() for v in verdicts]


def test_loader_errors_name_the_file_and_the_fix(comfy, tmp_path):
    with pytest.raises(MoLEError, match=r"absent.safetensors: the world's base model is missing; `python -m "
                                        r"trainer world-base` trains it"):
        world_base.load(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(MoLEError, match="junk.safetensors: not a readable safetensors file"):
        world_base.load(tmp_path / "junk.safetensors")
    tensors, metadata = world_base.load()
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**metadata, "mole.world_version": "2"})
    with pytest.raises(MoLEError, match=f"old.safetensors: trained on world version 2, the world is version "
                                        f"{world.VERSION}; `python -m trainer world-base`"):
        world_base.load(tmp_path / "old.safetensors")
    unhashed = {k: v for k, v in metadata.items() if k != "mole.text_encoder_sha256"}
    save_file(tensors, str(tmp_path / "unhashed.safetensors"), metadata=unhashed)
    with pytest.raises(MoLEError, match="metadata key 'mole.text_encoder_sha256' is missing"):
        world_base.load(tmp_path / "unhashed.safetensors")
    key = "model.diffusion_model.out.2.weight"
    cut = {k: v for k, v in tensors.items() if k != key}
    save_file(cut, str(tmp_path / "cut.safetensors"), metadata=metadata)
    with pytest.raises(MoLEError, match=rf"cut.safetensors: not the UNet of the world base \(1 missing \(first "
                                        rf"'{key}'\)\)"):
        world_base.load(tmp_path / "cut.safetensors")
    save_file({**tensors, "model.diffusion_model.extra": torch.zeros(1)}, str(tmp_path / "extra.safetensors"),
              metadata=metadata)
    with pytest.raises(MoLEError, match="1 unexpected \\(first 'model.diffusion_model.extra'\\)"):
        world_base.load(tmp_path / "extra.safetensors")
    save_file({**tensors, key: torch.zeros(4, 320, 1, 1, dtype=torch.float16)}, str(tmp_path / "shape.safetensors"),
              metadata=metadata)
    with pytest.raises(MoLEError, match=rf"'{key}' has shape \(4, 320, 1, 1\), expected \(4, 320, 3, 3\)"):
        world_base.load(tmp_path / "shape.safetensors")


def test_a_base_trained_with_another_text_encoder_is_refused(comfy, tmp_path):
    tensors, metadata = world_base.load()
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={**metadata, "mole.text_encoder_sha256": "0" * 64})
    out = tmp_path / "ckpt.safetensors"
    with pytest.raises(MoLEError, match=r"other.safetensors: trained with a text encoder of sha256 0{16}, but this "
                                        r"torch regenerates one of [0-9a-f]{16} from seed 1"):
        world_base.write_checkpoint(out, tmp_path / "other.safetensors")
    assert not out.exists()


def test_trained_unet_only_replaces_the_random_one(comfy):
    from comfyui_mole.trainer.harness.tiny_models import detectable_state_dict

    unet, _ = world_base.load()
    state = detectable_state_dict(seed=0, unet=unet)
    assert all(torch.equal(state[k], v) for k, v in unet.items())
    random_state = detectable_state_dict(seed=0)
    assert set(random_state) == set(state)
    text = [k for k in state if k.startswith("cond_stage_model.")]
    assert text and all(torch.equal(state[k], random_state[k]) for k in text)
