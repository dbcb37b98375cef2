"""The shipped models of the demo world (its VAE and its judge) share one loader (trainer/demo/assets.py): each
error names the file and the fix."""
import re

import pytest
from safetensors.torch import load_file, save_file

from comfyui_mole.mole_ops.errors import MoLEError
from comfyui_mole.trainer.demo import judge, vae, world


@pytest.mark.parametrize("module,command,key,kind", [
    (vae, "world-vae", "taesd_decoder.1.weight", "a TAESD state dict"),
    (judge, "world-judge", "head.weight", "a world judge"),
], ids=["vae", "judge"])
def test_loader_errors_name_the_file_and_the_problem(comfy, tmp_path, module, command, key, kind):
    with pytest.raises(MoLEError, match=rf"absent.safetensors: .* is missing; `python -m trainer {command}` trains"):
        module.load(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MoLEError, match="junk.safetensors: not a readable safetensors file"):
        module.load(tmp_path / "junk.safetensors")
    tensors = load_file(str(module.SHIPPED))
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"mole.world_version": "2"})
    with pytest.raises(MoLEError, match=f"old.safetensors: trained on world version 2, the world is version "
                                        f"{world.VERSION}"):
        module.load(tmp_path / "old.safetensors")
    del tensors[key]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata={"mole.world_version": str(world.VERSION)})
    with pytest.raises(MoLEError, match=rf"cut.safetensors: not {kind} \(key '{re.escape(key)}'"):
        module.load(tmp_path / "cut.safetensors")
