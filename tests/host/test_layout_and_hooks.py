"""mole_ops' layout against ComfyUI's own LoRA key map, and hooks on a real ModelPatcher's model."""
import pytest
import torch

from comfyui_mole.mole_ops.hooks import HookState, attach
from comfyui_mole.mole_ops.layout import SD15, SDXL, UNetLayout
from mole_fakes import make_mole
from comfyui_mole.mole_ops.ops import GateSettings
from comfyui_mole.trainer.harness import tiny_models


def sd15_structure(comfy):
    """SD1.5's exact block structure at tiny width (fast to build)."""
    return tiny_models._patcher("SD15", {**tiny_models.FULL_SD15, "model_channels": 32, "context_dim": 64,
                                         "num_heads": 2}, seed=0, dtype=torch.float32)


def layout_of(patcher):
    return UNetLayout.from_unet_config(patcher.model.model_config.unet_config)


@pytest.mark.parametrize("which,family,count", [("sd15", SD15, 192), ("sdxl", SDXL, 722)])
def test_layout_agrees_with_hosts_lora_key_map(comfy, tiny_sdxl, which, family, count):
    import comfy.lora

    patcher = sd15_structure(comfy) if which == "sd15" else tiny_sdxl
    layout = layout_of(patcher)
    assert layout.layer_keys == family.layer_keys and len(layout.layer_keys) == count
    host = comfy.lora.model_lora_keys_unet(patcher.model, {})
    for name, key in layout.name_map.items():
        if name.startswith("lora_unet_"):
            assert host.get(name) == key + ".weight", name
    modules = dict(patcher.model.named_modules())
    assert all(k in modules for k in layout.layer_keys)
    # every Linear inside a transformer block is a target
    inside = {n for n, m in modules.items() if ".transformer_blocks." in n and isinstance(m, torch.nn.Linear)}
    assert inside and inside <= set(layout.layer_keys)


def run_model(patcher, x, sigma, context):
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context)


def test_hooks_change_output_and_detach_bit_exact(tiny):
    mole, _ = make_mole(tiny)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=gen)          # non-square latent
    context = torch.randn(2, 5, 64, generator=gen)
    sigma = torch.tensor([3.0, 3.0])
    base = run_model(tiny, x, sigma, context)
    keys = list(tiny.model.state_dict())
    state = HookState(GateSettings("both"))
    handles = attach(tiny.model, mole, state)
    patched = run_model(tiny, x, sigma, context)
    assert list(tiny.model.state_dict()) == keys
    state.active = False
    inactive = run_model(tiny, x, sigma, context)
    for h in handles:
        h.remove()
    after = run_model(tiny, x, sigma, context)
    assert (patched - base).abs().max() > 1e-3
    assert torch.equal(inactive, base) and torch.equal(after, base)


def test_hooks_refuse_a_model_of_another_shape(tiny, tiny_sdxl):
    from comfyui_mole.mole_ops.errors import MismatchError

    mole, _ = make_mole(tiny_sdxl, n=1)
    with pytest.raises(MismatchError, match="do not exist in this model|another base"):
        attach(tiny.model, mole, HookState(GateSettings()))
