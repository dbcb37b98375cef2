import torch

from comfyui_mole.mole_ops.viz import gate_map_grid, heat, overlay


def test_heat_is_monotone_in_brightness_and_bounded():
    colours = heat(torch.linspace(0, 1, 11).view(1, 11))
    brightness = colours.sum(-1)[0]
    assert colours.shape == (1, 11, 3) and colours.min() >= 0 and colours.max() <= 1
    assert (brightness[1:] >= brightness[:-1]).all()


def test_grid_and_overlay_shapes_for_non_square_maps():
    maps = torch.rand(3, 2, 4, 6)
    grid = gate_map_grid(maps, cell=24)
    assert grid.shape == (1, 3 * 16 + 2 * 2, 2 * 24 + 2, 3)
    over = overlay(torch.rand(2, 32, 48, 3), torch.rand(2, 2, 4, 6))
    assert over.shape == (2, 32, 96, 3) and over.std() > 0
