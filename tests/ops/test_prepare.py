"""Dataset preparation: caption clean-up, sliding-window geometry, and a run over generated images of several
sizes with broken and caption-less files (no CLIP here; the CLIP score filter is tested in tests/e2e)."""
import argparse
import json

import pytest
from PIL import Image

from comfyui_mole.trainer.training import prepare
from comfyui_mole.trainer.training.config import ConfigError
from comfyui_mole.trainer.training.data import Subset, scan_subset


@pytest.mark.parametrize("raw,clean", [
    ("The image features a woman in a red dress sitting on a bench, showcasing her elegant style.",
     "a woman in a red dress sitting on a bench."),
    ("In this image, a man waves his hand. The scene is bright, creating a cheerful atmosphere.",
     "a man waves his hand. The scene is bright."),
    ("The photo shows two kids playing football , demonstrating teamwork and joy",
     "two kids playing football"),
    ("A close-up of a hand holding a cup.", "A close-up of a hand holding a cup."),
    ("The image features   , showcasing", ""),
])
def test_caption_clean_up(raw, clean):
    assert prepare.clean_caption(raw) == clean


def test_extra_phrases_are_removed():
    assert prepare.clean_caption("a portrait, high quality, of a girl", ("high quality",)) == "a portrait, of a girl"


@pytest.mark.parametrize("size,window,stride,expected", [
    ((2048, 1536), 1024, 1024, [(0, 0), (1024, 0), (0, 512), (1024, 512)]),
    ((1500, 1100), 1024, 1024, [(0, 0), (476, 0), (0, 76), (476, 76)]),
    ((1024, 1024), 1024, 512, [(0, 0)]),
    ((2048, 1024), 1024, 512, [(0, 0), (512, 0), (1024, 0)]),
])
def test_sliding_windows(size, window, stride, expected):
    crops = prepare.windows(*size, window, stride)
    assert [(x, y) for x, y, _ in crops] == expected and {s for _, _, s in crops} == {window}
    assert all(x + window <= size[0] and y + window <= size[1] for x, y, _ in crops)


def test_small_image_gives_its_centre_square():
    assert prepare.windows(800, 600, 1024, 1024) == [(100, 0, 600)]


def args(tmp_path, **kw):
    values = {"input_dir": tmp_path / "raw", "output_dir": tmp_path / "out", "in_json": None,
              "caption_extension": ".caption", "window": 128, "stride": None, "size": 64, "format": "png",
              "drop_phrase": [], "clip_model": None, "clip_threshold": None, "batch_size": 4}
    return argparse.Namespace(**{**values, **kw})


def make_raw(folder):
    folder.mkdir()
    sizes = {"big": (256, 192), "wide": (300, 128), "medium": (100, 80), "small": (40, 40)}
    for name, size in sizes.items():
        Image.new("RGB", size, (len(name) * 20, 90, 140)).save(folder / f"{name}.png")
        (folder / f"{name}.caption").write_text(f"The image features a {name} picture, creating a mood.")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "broken.caption").write_text("a broken file")
    Image.new("RGB", (200, 200)).save(folder / "nocaption.jpg")
    Image.new("RGB", (200, 200)).save(folder / "boiler.png")
    (folder / "boiler.caption").write_text("The image shows , showcasing")
    return sizes


def test_prepare_crops_cleans_and_reports(tmp_path):
    make_raw(tmp_path / "raw")
    report = prepare.prepare(args(tmp_path))
    out = tmp_path / "out"
    # big 256x192: 2 x 2 windows of 128; wide 300x128: 3 windows (0, 128, 172); medium: centre square; small: dropped
    assert report.written == report.crops == 4 + 3 + 1
    assert dict(report.dropped_sources) == {"unreadable image": 1, "no caption": 1, "smaller than 64 px": 1,
                                            "empty caption after clean-up": 1}
    metadata = json.loads((out / "metadata.json").read_text())
    files = sorted(p.stem for p in (out / "images").iterdir())
    assert sorted(metadata) == files and len(files) == 8
    assert metadata["big_0"] == {"caption": "a big picture.", "train_resolution": [64, 64]}
    assert all(Image.open(p).size == (64, 64) for p in (out / "images").iterdir())
    text = (out / "prepare_report.md").read_text()
    assert "| image | unreadable image | 1 |" in text and "| broken.png | 0 | unreadable image |" in text
    assert json.loads((out / "prepare_report.json").read_text())["written"] == 8
    assert not list(out.rglob("*.tmp*")) and sorted(p.name for p in (tmp_path / "raw").iterdir())[0] == "big.caption"
    # the trainer reads the result as kohya fine-tune data
    found, skipped = scan_subset(Subset(str(out / "images"), metadata_file=str(out / "metadata.json")))
    assert len(found) == 8 and not skipped


def test_prepare_reads_captions_from_metadata_and_fails_clearly(tmp_path):
    make_raw(tmp_path / "raw")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"big.png": {"caption": "a big picture", "tags": "outdoor"}}))
    report = prepare.prepare(args(tmp_path, in_json=meta, stride=64))
    assert report.written == 3 * 2 and report.dropped_sources["no caption"] == 6
    with pytest.raises(ConfigError, match="must differ from --input_dir"):
        prepare.prepare(args(tmp_path, output_dir=tmp_path / "raw"))
    with pytest.raises(ConfigError, match="--clip_threshold needs --clip_model"):
        prepare.prepare(args(tmp_path, clip_threshold=20.0))
    with pytest.raises(ConfigError, match="--clip_model .*nowhere: not a folder"):
        prepare.prepare(args(tmp_path, clip_model=tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a Hugging Face CLIP folder"):
        prepare.prepare(args(tmp_path, clip_model=tmp_path / "empty"))
    with pytest.raises(ConfigError, match="--window 32 at least --size|--window \\(32\\) at least --size"):
        prepare.prepare(args(tmp_path, window=32))
