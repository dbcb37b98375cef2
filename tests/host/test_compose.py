"""MoLE composes with the rest of a graph: stock LoRAs (either order), low-VRAM weight streaming, ControlNet and
model-function wrappers; any image size, batch sizes > 1, CFG on and off; the different-base warning."""
import pytest
import torch

from comfyui_mole.mole_ops.fingerprint import METADATA_KEY, check_base, fingerprint
from comfyui_mole.mole_ops.trace import COND, UNCOND, GateTrace
from mole_fakes import make_mole
from host_utils import attach, conditioning, sample, with_controlnet

TARGET = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture
def mole(tiny):
    built, _ = make_mole(tiny)
    return built


def stock_lora(model, strength=1.0):
    """A kohya-named LoRA on one layer, loaded with ComfyUI's own LoRA code (what LoraLoader runs)."""
    import comfy.lora
    import comfy.sd

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    name = next(k for k, v in key_map.items() if v == TARGET and k.startswith("lora_unet_"))
    out_f, in_f = model.get_model_object(TARGET).shape
    gen = torch.Generator().manual_seed(7)
    lora = {f"{name}.lora_down.weight": torch.randn(4, in_f, generator=gen) * 0.3,
            f"{name}.lora_up.weight": torch.randn(out_f, 4, generator=gen) * 0.3, f"{name}.alpha": torch.tensor(4.0)}
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    return patched


def test_stock_lora_before_or_after_apply_mole_keeps_both_effects(tiny, mole):
    base, only_mole = sample(tiny), sample(attach(tiny, mole))
    only_lora = sample(stock_lora(tiny))
    before = sample(attach(stock_lora(tiny), mole))
    after = sample(stock_lora(attach(tiny, mole)))
    assert (only_lora - base).abs().max() > 1e-4 and (only_mole - base).abs().max() > 1e-4
    assert (before - only_mole).abs().max() > 1e-4 and (before - only_lora).abs().max() > 1e-4
    # MoLE adds its term on the layer input, the LoRA changes the weight: the order does not matter
    torch.testing.assert_close(before, after, rtol=0, atol=1e-5)
    assert torch.equal(sample(tiny), base)


def test_low_vram_streaming_gives_the_full_load_image(tiny, mole, monkeypatch):
    """Force ComfyUI's partial load (what a small GPU gets): most weights stay offloaded and are cast, with their
    LoRA patches, per forward. MoLE's hooks must act the same as with the model fully loaded."""
    import comfy.model_management as mm

    model = attach(stock_lora(tiny), mole)
    mm.unload_all_models()
    full = sample(model)
    mm.unload_all_models()
    original = mm.LoadedModel.model_load
    monkeypatch.setattr(mm.LoadedModel, "model_load",
                        lambda self, lowvram_model_memory=0, force_patch_weights=False:
                        original(self, lowvram_model_memory=64 * 1024, force_patch_weights=force_patch_weights))
    try:
        low = sample(model)
        assert model.model.model_lowvram and model.model.lowvram_patch_counter > 0
    finally:
        monkeypatch.undo()
        mm.unload_all_models()
    torch.testing.assert_close(low, full, rtol=0, atol=1e-4)
    assert (full - sample(tiny)).abs().max() > 1e-4


def test_controlnet_and_model_function_wrappers_still_run(tiny, mole):
    import nodes

    positive, negative = with_controlnet(tiny, *conditioning())
    calls = []

    def wrapper(apply_model, args):
        calls.append(args["timestep"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    def run(model):
        latent = {"samples": torch.zeros(1, 4, 4, 6)}
        with torch.inference_mode():
            return nodes.common_ksampler(model, 0, 3, 4.0, "euler", "normal", positive, negative, latent)[0][
                "samples"]

    wrapped = tiny.clone()
    wrapped.set_model_unet_function_wrapper(wrapper)
    base = run(wrapped)
    assert calls
    calls.clear()
    with_mole = run(attach(wrapped, mole))
    assert calls, "the model-function wrapper was dropped"
    assert (with_mole - base).abs().max() > 1e-4
    torch.testing.assert_close(run(wrapped), base, rtol=0, atol=0)


@pytest.mark.parametrize("width,height,batch,cfg", [(40, 72, 1, 4.0), (72, 40, 3, 4.0), (48, 48, 2, 1.0)])
def test_any_size_batch_and_cfg(tiny, mole, width, height, batch, cfg):
    trace = GateTrace(mole.order)
    base = sample(tiny, width=width, height=height, batch=batch, cfg=cfg)
    out = sample(attach(tiny, mole, trace=trace), width=width, height=height, batch=batch, cfg=cfg)
    assert out.shape == base.shape == (batch, 4, height // 8, width // 8)
    assert (out - base).abs().max() > 1e-4
    maps = trace.local_maps(COND)
    assert maps.shape[1:] == (batch, 2, height // 8, width // 8)
    assert any(kind == UNCOND for _, kind in trace.local) == (cfg != 1.0)   # CFG 1 skips the negative


def test_different_base_fingerprint_warns(tiny, mole):
    from mole_fakes import fake_expert

    unet = tiny.model.diffusion_model
    mine = fingerprint(unet)
    assert mine.startswith("unet-sha256:") and fingerprint(unet) == mine
    experts = [fake_expert(n, {"x": (4, 4, False)}, rank=2) for n in ("face", "hand")]
    assert check_base(unet, experts) == []                      # no fingerprint in metadata: nothing to check
    experts[0].metadata[METADATA_KEY] = mine
    assert check_base(unet, experts) == []
    experts[1].metadata[METADATA_KEY] = "unet-sha256:0123456789abcdef"
    (warning,) = check_base(unet, experts)
    assert "'hand'" in warning and "another base model" in warning


def test_a_direct_unet_call_outside_sampling_runs_the_loaded_clones_mole(tiny, mole):
    """A node that calls the MoLE model's apply_model itself (no sampling run, so no OUTER_SAMPLE wrapper): the
    loaded clone's patch acts, and only that clone's; loading another clone (or the base) takes it out."""
    import comfy.model_management as mm

    from comfyui_mole.mole_ops.ops import GateSettings

    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 4, 6, generator=gen), torch.randn(1, 7, 64, generator=gen)
    sigma = torch.tensor([2.0])

    def direct(model):
        mm.load_models_gpu([model])
        with torch.no_grad():
            return model.model.apply_model(x, sigma, c_crossattn=context)

    base = direct(tiny)
    full = attach(tiny, mole)
    half = attach(tiny, mole, settings=GateSettings("both", {"face": 0.5, "hand": 0.5}))
    off = attach(tiny, mole, settings=GateSettings("both", {"face": 0.0, "hand": 0.0}))
    a, b = direct(full), direct(half)
    assert (a - base).abs().max() > 1e-4 and (b - base).abs().max() > 1e-4 and (a - b).abs().max() > 1e-5
    assert torch.equal(direct(off), base)
    torch.testing.assert_close(direct(full), a, rtol=0, atol=0)
    assert torch.equal(direct(tiny), base)                     # the base again: no MoLE left in the model
    assert torch.equal(sample(tiny), sample(tiny))
