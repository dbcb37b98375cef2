"""Attaching a MoLE to a real ModelPatcher and sampling through ComfyUI's sampler (tiny model)."""
import pytest
import torch

from comfyui_mole.mole_ops.ops import GateSettings
from comfyui_mole.mole_ops.trace import COND, UNCOND, GateTrace
from host_utils import sample
from mole_fakes import make_mole


@pytest.fixture
def mole(tiny):
    built, _ = make_mole(tiny)
    return built


def test_apply_changes_output_and_leaves_the_base_untouched(tiny, mole):
    from comfyui_mole.nodes.patch import MoLEPatch, apply_mole

    base = sample(tiny)
    patched_model = apply_mole(tiny, MoLEPatch(mole))
    patched = sample(patched_model)
    again = sample(tiny)
    assert (patched - base).abs().max() > 1e-4
    assert torch.equal(again, base)
    assert not tiny.get_injections("mole") and patched_model.get_injections("mole")


def test_two_clones_with_different_settings_do_not_leak(tiny, mole):
    from comfyui_mole.nodes.patch import MoLEPatch, apply_mole

    a = apply_mole(tiny, MoLEPatch(mole, GateSettings("both", {"hand": 0.0})))
    b = apply_mole(tiny, MoLEPatch(mole, GateSettings("none")))
    first_a, first_b, second_a = sample(a), sample(b), sample(a)
    assert (first_a - first_b).abs().max() > 1e-4
    assert torch.equal(first_a, second_a)


def test_schedule_range_outside_gives_base_and_trace_records_steps(tiny, mole):
    from comfyui_mole.nodes.patch import MoLEPatch, apply_mole

    base = sample(tiny, batch=2)
    off = sample(apply_mole(tiny, MoLEPatch(mole, start_percent=1.01, end_percent=1.0)), batch=2)
    assert torch.equal(off, base)
    trace = GateTrace(mole.order)
    traced = sample(apply_mole(tiny, MoLEPatch(mole, trace=trace)), batch=2, steps=4)
    untraced = sample(apply_mole(tiny, MoLEPatch(mole)), batch=2, steps=4)
    assert torch.equal(traced, untraced)
    maps = trace.local_maps(COND)
    assert trace.steps() == [0, 1, 2, 3]
    assert maps.shape == (4, 2, 2, 4, 6)   # steps, rows, experts, latent H, W (non-square)
    assert trace.global_curve(UNCOND).shape == (4, 2, 2)
    assert ((maps > 0) & (maps < 1)).all() and maps.std() > 0


def test_a_stock_weight_patch_keeps_working_with_mole(tiny, mole):
    """A LoRA-style weight patch (what LoraLoader adds) before Apply MoLE: both effects remain."""
    from comfyui_mole.nodes.patch import MoLEPatch, apply_mole

    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    weight = tiny.get_model_object(key)
    lora = tiny.clone()
    lora.add_patches({key: (torch.full_like(weight, 0.05),)}, 1.0)
    both = sample(apply_mole(lora, MoLEPatch(mole)))
    only_lora, only_mole, base = sample(lora), sample(apply_mole(tiny, MoLEPatch(mole))), sample(tiny)
    assert (only_lora - base).abs().max() > 1e-4
    assert (both - only_mole).abs().max() > 1e-4 and (both - only_lora).abs().max() > 1e-4
    assert torch.equal(sample(tiny), base)


def test_clones_record_into_traces_of_their_own(tiny, mole):
    """ModelPatcher clones of a traced model get forks of its trace: each clone's runs stay in its own trace (and
    reach the original, which Apply MoLE returned), never in a sibling's; a clone's own patch is the one that acts."""
    from comfyui_mole.nodes.patch import KEY, MoLEPatch, apply_mole

    trace = GateTrace(mole.order)
    applied = apply_mole(tiny, MoLEPatch(mole, trace=trace))
    a, b = applied.clone(), applied.clone()
    ta, tb = a.get_attachment(KEY).trace, b.get_attachment(KEY).trace
    assert len({id(trace), id(ta), id(tb)}) == 3
    assert a.get_attachment(KEY).mole is b.get_attachment(KEY).mole is mole        # tensors shared, not copied
    sample(a, steps=3)
    assert ta.steps() == [0, 1, 2] and not tb.local and trace.steps() == [0, 1, 2]
    sample(b, steps=2)
    assert tb.steps() == [0, 1] and ta.steps() == [0, 1, 2] and trace.steps() == [0, 1]
    torch.testing.assert_close(tb.local_maps(COND), trace.local_maps(COND), rtol=0, atol=0)
    b.get_attachment(KEY).settings = GateSettings("none")
    assert a.get_attachment(KEY).settings.mode == "both"
    assert not torch.equal(sample(a), sample(b))
    assert torch.equal(sample(a), sample(applied))
