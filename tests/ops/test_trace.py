"""The gate trace: aggregation over layers, resolutions, calls and row kinds."""
import pytest
import torch

from comfyui_mole.mole_ops.trace import COND, UNCOND, GateTrace, token_grid


def test_token_grid_handles_non_square_and_odd_latents():
    assert token_grid(8 * 12, 8, 12) == (8, 12)
    assert token_grid(4 * 6, 8, 12) == (4, 6)
    assert token_grid(3 * 4, 5, 7) == (3, 4)   # ceil at odd sizes
    with pytest.raises(ValueError, match="fit no downsampling"):
        token_grid(7, 8, 12)


def test_trace_averages_layers_and_calls_and_separates_cond_uncond():
    trace = GateTrace(("face", "hand"))
    for call in range(2):
        trace.begin_call(0, (4, 6), [COND, COND, UNCOND])
        full = torch.full((3, 24, 2), 0.2)
        full[0, :, 0] = 0.8
        trace.record("diffusion_model.input_blocks.1.1.proj_in", full, torch.full((3, 2), 0.5), ["face", "hand"])
        half = torch.full((3, 6, 1), 0.4)                     # a 2x3 level, only "hand" active
        trace.record("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q", half, None, ["hand"])
        text = torch.full((3, 5, 2), 0.99)                    # text tokens: must be ignored
        trace.record("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k", text, None, ["face", "hand"])
        trace.end_call()
    cond = trace.local_maps(COND)
    assert cond.shape == (1, 2, 2, 4, 6)
    torch.testing.assert_close(cond[0, 0, 0], torch.full((4, 6), 0.4))     # (0.8 + 0) / 2 layers
    torch.testing.assert_close(cond[0, 1, 1], torch.full((4, 6), 0.3))     # (0.2 + 0.4) / 2
    assert trace.local_maps(UNCOND).shape == (1, 1, 2, 4, 6)
    torch.testing.assert_close(trace.global_curve(COND), torch.full((1, 2, 2), 0.5))
    assert trace.steps() == [0]
    assert trace.nbytes() < 10_000


def test_trace_memory_does_not_grow_with_layers():
    trace = GateTrace(("face",))
    trace.begin_call(0, (8, 8), [COND])
    for _ in range(500):
        trace.record("diffusion_model.x.proj_in", torch.rand(1, 64, 1), torch.rand(1, 1), ["face"])
    trace.end_call()
    assert trace.nbytes() == (64 + 1) * 4


def test_a_new_run_replaces_the_previous_one():
    trace = GateTrace(("face",))
    for run_value in (0.2, 0.6):
        for step in range(3):
            trace.begin_call(step, (2, 2), [COND])
            trace.record("diffusion_model.x.proj_in", torch.full((1, 4, 1), run_value), None, ["face"])
            trace.end_call()
    torch.testing.assert_close(trace.local_maps(COND), torch.full((3, 1, 1, 2, 2), 0.6))
