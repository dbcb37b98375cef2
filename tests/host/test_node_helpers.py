"""Small helpers of the nodes (they import ComfyUI's node API, hence the host ring)."""
import pytest


def test_parse_steps(comfy):
    from comfyui_mole.mole_ops.errors import MoLEError
    from comfyui_mole.nodes.visualise import parse_steps

    assert parse_steps("auto", 4) == [0, 1, 2, 3]
    assert parse_steps("auto", 50) == [0, 10, 20, 29, 39, 49]
    assert parse_steps("all", 3) == [0, 1, 2] and parse_steps(" 0, 2 ", 3) == [0, 2]
    with pytest.raises(MoLEError, match=r"steps \[7\] are outside 0..2"):
        parse_steps("0,7", 3)
    with pytest.raises(MoLEError, match="give 'all', 'auto' or step numbers"):
        parse_steps("first", 3)
