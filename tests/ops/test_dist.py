"""How a global batch is split across processes: every row once, and DDP's average of the weighted losses is
the mean over the global batch, also for a last batch smaller than the world."""
import pytest
import torch

from comfyui_mole.trainer.training.data import BatchPlan, Dataset, Subset
from comfyui_mole.trainer.training.dist import World


@pytest.mark.parametrize("n,size", [(4, 2), (3, 2), (1, 2), (5, 3), (7, 1)])
def test_rows_cover_the_batch_and_average_to_its_mean(n, size):
    losses = torch.rand(n, dtype=torch.float64)
    covered, averaged = [], 0.0
    for rank in range(size):
        rows, factor = World(rank, size).rows(n)
        if factor:
            covered += rows
        averaged += float(losses[rows].sum()) / n * factor / size
    assert sorted(covered) == list(range(n))
    assert averaged == pytest.approx(float(losses.mean()))


def test_plan_makes_global_batches_of_batch_times_processes(tmp_path):
    items = [(tmp_path / f"{i}.png", f"c{i}", Subset(str(tmp_path))) for i in range(10)]
    d = Dataset((64, 64), 2, [items[0][2]], items=items)
    one, two = BatchPlan([d], processes=1), BatchPlan([d], processes=2)
    order = two.epoch(torch.Generator().manual_seed(0))
    assert [len(indices) for _, indices in order if len(indices) != 4] == [2] and len(two) == 3 == len(order)
    assert len(one) == 5
