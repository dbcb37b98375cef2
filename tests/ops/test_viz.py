import pytest
import torch

from comfyui_mole.mole_ops.viz import COLOUR_BAR, gate_map_grid, heat, overlay


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


@pytest.mark.parametrize("size", [64, 1024])
def test_the_overlay_names_each_expert_above_its_panel_at_preview_and_full_size(size):
    image, maps = torch.full((1, size, size, 3), 0.5), torch.rand(1, 2, size // 8, size // 8)
    plain = overlay(image, maps)
    named = overlay(image, maps, experts=("face", "hand"))
    font = max(10, min(96, size // 12))
    band = int(font * 1.6)
    assert named.shape == (1, size + band, 2 * size + 4, 3)
    assert torch.allclose(named[:, band:, :size], plain[:, :, :size], atol=1 / 255)      # the panels, unchanged
    assert torch.allclose(named[:, band:, size + 4:], plain[:, :, size:], atol=1 / 255)
    for left in (0, size + 4):                            # dark text on the white band above each panel
        header = named[0, :band, left:left + size]
        dark = (header.mean(-1) < 0.5).float().mean()
        assert 0.01 < dark < 0.5, (size, left, dark)


def test_labelled_gate_grid_and_image_grid():
    from comfyui_mole.mole_ops.viz import labelled_grid

    maps = torch.rand(3, 2, 4, 6)
    plain = gate_map_grid(maps, cell=24)
    labelled = gate_map_grid(maps, cell=24, experts=("face", "hand"), steps=[0, 5, 9])
    assert labelled.shape == (1, 22 + plain.shape[1], 64 + plain.shape[2] + COLOUR_BAR, 3)
    right = 64 + plain.shape[2]
    assert torch.allclose(labelled[:, 22:, 64:right], plain, atol=1 / 255)   # the maps, unchanged, beside labels
    assert (labelled[0, :22, 64:right] < 0.5).any() and (labelled[0, 22:, :64] < 0.5).any()   # text drawn
    middle = gate_map_grid(0.4 + 0.2 * maps, cell=24, experts=("face", "hand"), steps=[0, 5, 9])
    bar = middle[0, 22:, right + 8:right + 20]              # the colour bar: open (bright) on top, closed below
    assert torch.allclose(bar[0, 6], heat(torch.tensor(1.0)), atol=2 / 255)
    assert torch.allclose(bar[-1, 6], heat(torch.tensor(0.0)), atol=2 / 255)
    marked = (middle[0, 22:, right + 5, 2] > 0.9) & (middle[0, 22:, right + 5, 0] < 0.1)   # min/max marks (blue)
    rows = marked.nonzero().flatten().float() / (bar.shape[0] - 1)
    assert abs((1 - rows.min()) - float(0.4 + 0.2 * maps.max())) < 0.05
    assert abs((1 - rows.max()) - float(0.4 + 0.2 * maps.min())) < 0.05

    grid = labelled_grid([torch.rand(1, 20, 30, 3), torch.rand(2, 10, 10, 3)], ["base", "mole"], columns=2)
    band = (grid.shape[1] - 4) // 2 - 20
    assert grid.shape == (1, 2 * (20 + band) + 4, 2 * 30 + 4, 3) and band > 0   # 3 cells (a batch of 2), 2 columns


def test_gate_curves_plot():
    from comfyui_mole.mole_ops.plots import gate_curves

    image = gate_curves(torch.rand(5, 2), ("face", "hand"), [0, 1, 2, 3, 4], "global gates")
    assert image.shape == (1, 400, 640, 3) and 0 <= image.min() and image.max() <= 1 and image.std() > 0.01
