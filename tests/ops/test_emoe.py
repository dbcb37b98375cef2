"""EMoE's disagreement score on constructed ensembles whose answer is known."""
import pytest
import torch

from comfyui_mole.mole_ops.emoe import DISAGREEMENT, disagreement, member_rows
from comfyui_mole.mole_ops.errors import MoLEError


def test_identical_members_give_zero():
    f = torch.randn(1, 2, 8, 4, 6).expand(4, -1, -1, -1, -1)
    d = disagreement(f)
    assert torch.equal(d.score, torch.zeros(2)) and d.map.shape == (2, 4, 6) and not d.map.any()


def test_known_perturbation_gives_its_variance():
    base = torch.randn(1, 3, 5, 4, 4)
    offsets = torch.tensor([-1.5, 0.0, 0.5, 2.0])                 # member m adds offsets[m] everywhere
    f = base + offsets.view(4, 1, 1, 1, 1)
    expected = offsets.var(unbiased=False)                         # population variance: 1.796875
    d = disagreement(f)
    torch.testing.assert_close(d.score, expected.expand(3))
    torch.testing.assert_close(d.map, expected.expand(3, 4, 4))
    # a perturbation on one channel only: the score is diluted by the channel count, the map too
    g = base.repeat(4, 1, 1, 1, 1)
    g[:, :, 0] += offsets.view(4, 1, 1, 1)
    torch.testing.assert_close(disagreement(g).score, (expected / 5).expand(3))


def test_summary_labels_and_errors():
    d = disagreement(torch.randn(2, 1, 2, 2, 2), kind=DISAGREEMENT)
    assert "expert disagreement from 2 members" in d.summary() and "not as epistemic uncertainty" in d.summary()
    assert "Fewer than 4 members" in d.summary()
    with pytest.raises(MoLEError, match="at least 2 members"):
        disagreement(torch.randn(1, 1, 2, 2, 2))
    rows = member_rows(2, 3, 2, [0, 1])
    assert rows.tolist() == [[1, 0]] * 3 + [[0, 1]] * 3
