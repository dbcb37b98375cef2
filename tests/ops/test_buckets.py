"""Aspect-ratio bucketing (kohya's options) on generated images of several sizes, broken files included."""
import math

import pytest
import torch
from PIL import Image

from comfyui_mole.trainer.training.buckets import BucketSettings, assign, bucket_sizes
from comfyui_mole.trainer.training.config import ConfigError, TrainConfig
from comfyui_mole.trainer.training.data import BatchPlan, datasets_from_config


def test_bucket_sizes_fit_the_area_and_the_steps():
    s = BucketSettings((512, 512), min_reso=256, max_reso=1024, steps=64)
    sizes = bucket_sizes(s)
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert all(256 <= side <= 1024 for wh in sizes for side in wh)
    assert sizes == sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0]))


def test_assignment_by_aspect_ratio_and_no_upscale():
    s = BucketSettings((512, 512), 256, 1024, 64)
    sizes = bucket_sizes(s)
    assert assign((1000, 1000), sizes, s) == (512, 512)
    w, h = assign((1536, 1024), sizes, s)
    best = min(abs(math.log(bw / bh / 1.5)) for bw, bh in sizes)
    assert abs(math.log(w / h / 1.5)) == best and w > h            # the nearest aspect ratio (640x384 here)
    w, h = assign((600, 1800), sizes, s)
    assert h > w and abs(w / h - 1 / 3) < 0.1
    small = BucketSettings((512, 512), 256, 1024, 64, no_upscale=True)
    assert assign((300, 200), sizes, small) == (256, 192)     # its own size, rounded down, never enlarged
    assert assign((1000, 1000), sizes, small) == (512, 512)   # larger than the area: a normal bucket


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 60}, "multiple of 8"), ({"min_reso": 512, "max_reso": 256}, "min_bucket_reso <= max_bucket_reso"),
    ({"min_reso": 200}, "multiples of bucket_reso_steps"),
])
def test_bad_bucket_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BucketSettings((512, 512), **{"min_reso": 256, "max_reso": 1024, "steps": 64, **kwargs})


def test_dataset_batches_stay_within_buckets(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = [(64, 64), (64, 64), (128, 64), (128, 64), (128, 64), (64, 128), (40, 120)]
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i * 30, 50, 90)).save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text(f"picture {i}")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    (folder / "broken.caption").write_text("broken")
    caplog.set_level("INFO")
    config = TrainConfig(pretrained_model_name_or_path="x", output_dir="o", output_name="n",
                         train_data_dir=str(folder), resolution="64", train_batch_size=2, enable_bucket=True,
                         min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    (d,) = datasets_from_config(config)
    assert len(d.items) == 7 and len(d.skipped) == 1
    assert "bucket(s) in use" in caplog.text
    by_image = {p.name: size for (p, _, _), size in zip(d.items, d.sizes)}
    assert by_image["0.png"] == (64, 64) and by_image["2.png"][0] > by_image["2.png"][1]
    assert by_image["5.png"][1] > by_image["5.png"][0] and by_image["6.png"][1] > by_image["6.png"][0]
    plan = BatchPlan([d])
    epoch = plan.epoch(torch.Generator().manual_seed(0))
    assert len(epoch) == len(plan)
    for entry in epoch:
        _, indices = entry
        assert len({d.sizes[i] for i in indices}) == 1          # one bucket per batch
        assert plan.make(entry, torch.Generator()).size == d.sizes[indices[0]]
    assert sorted(i for _, b in epoch for i in b) == list(range(7))
