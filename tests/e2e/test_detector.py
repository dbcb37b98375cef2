"""Real photos in: the detector in its own environment (scripts/detector-env.sh, mediapipe's bundled models) finds
the faces of two real photographs (scikit-image's astronaut.png and camera.png, installed at test time into a
temporary folder, never committed); `prepare --detect --closeups --require person` writes the face masks where the
trainer and the checks read them, the face close-ups, and drops pictures without a person with its reason."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_mole.trainer.training.detector import Detector, grown_box, region_mask

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ("astronaut", "camera")


@pytest.fixture(scope="module")
def detector_python(tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("detector") / "venv"
    subprocess.run(["bash", str(ROOT / "scripts" / "detector-env.sh"), str(env)], check=True, timeout=900)
    return env / "bin" / "python"


@pytest.fixture(scope="module")
def photos(detector_python, tmp_path_factory) -> Path:
    """The two photographs, with captions, and a picture of no one (noise)."""
    folder = tmp_path_factory.mktemp("photos")
    package = folder / "package"
    subprocess.run([str(detector_python), "-m", "pip", "install", "-q", "--no-deps", "--target", str(package),
                    "scikit-image==0.26.0"], check=True, timeout=600)
    raw = folder / "raw"
    raw.mkdir()
    for name in PHOTOS:
        (raw / f"{name}.png").write_bytes((package / "skimage" / "data" / f"{name}.png").read_bytes())
        (raw / f"{name}.caption").write_text(f"a photo of a person ({name})")
    noise = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(noise).save(raw / "nobody.png")
    (raw / "nobody.caption").write_text("noise")
    return raw


def test_the_detector_finds_the_face_of_each_photo(detector_python, photos):
    with Detector(detector_python, {"face": 0.5, "hand": 0.5, "person": 0.5}) as detector:
        assert detector.version == "0.10.21"
        for name in PHOTOS:
            found = detector.find(photos / f"{name}.png", ["face", "hand", "person"])
            assert found.error == "" and found.size == (512, 512)
            (face,) = found.parts["face"]
            assert face["score"] > 0.8 and found.parts["person"]
            x0, y0, x1, y1 = face["box"]
            assert 60 < x1 - x0 < 140 and 60 < y1 - y0 < 140        # a face of about 100 px, not the picture
            assert found.parts["hand"] == []                           # gloved (astronaut) or in shadow (camera)
        found = detector.find(photos / "nobody.png", ["face", "hand", "person"])
        assert found.parts == {"face": [], "hand": [], "person": []}
        assert "cannot be read" in detector.find(photos / "missing.png", ["face"]).error


def test_prepare_writes_face_masks_closeups_and_drops_pictures_without_a_person(detector_python, photos, tmp_path):
    out = tmp_path / "prepared"
    done = subprocess.run([sys.executable, "-m", "trainer", "prepare", "--input_dir", str(photos), "--output_dir",
                           str(out), "--window", "512", "--size", "512", "--detect", "face,hand", "--closeups",
                           "face,hand", "--closeup_size", "256", "--closeup_min", "128", "--require", "person",
                           "--detector_python", str(detector_python)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["no_person"] == ["nobody.png"] and report["dropped_sources"] == {
        "no person found by the detector": 1}
    assert report["detected"] == {"face": 2, "hand": 0} and report["closeups"] == {"face": 2}
    with Detector(detector_python) as detector:
        for name in PHOTOS:
            (face,) = detector.find(photos / f"{name}.png", ["face"]).parts["face"]
            mask = np.asarray(Image.open(out / "masks" / f"{name}_0_face.png")) > 127
            x0, y0, x1, y1 = face["box"]
            cx, cy = round((x0 + x1) / 2), round((y0 + y1) / 2)
            assert mask[cy - 10:cy + 10, cx - 10:cx + 10].all()                  # the face is covered
            gx0, gy0, gx1, gy1 = grown_box(face["box"], 0.15)
            outside = mask.copy()
            outside[max(0, int(gy0)):int(gy1) + 1, max(0, int(gx0)):int(gx1) + 1] = False
            assert not outside.any()                                            # and nothing else
            assert np.array_equal(np.asarray(Image.open(out / "masks_face" / f"{name}_0.png")) > 127, mask)
            assert not (np.asarray(Image.open(out / "masks" / f"{name}_0_hand.png")) > 127).any()
            closeup = out / "closeups_face" / f"{name}_face0.png"
            assert Image.open(closeup).size == (256, 256)
            assert (out / "closeups_face" / "masks" / f"{name}_face0.png").is_file()
            assert "a close-up of a face, a photo of a person" in closeup.with_suffix(".caption").read_text()
            assert (out / "images" / f"{name}_0.caption").read_text() == f"a photo of a person ({name})"
    assert "dropped, no person found: 1 (nobody.png)" in (out / "prepare_report.md").read_text()
    assert (out / "detections.png").stat().st_size > 1000
    toml = (out / "face.toml").read_text()
    assert 'conditioning_data_dir = "masks_face"' in toml and 'image_dir = "closeups_face"' in toml


def test_a_hand_mask_is_the_grown_hull_of_its_landmarks():
    """The hand path from landmark points (no real photograph of a bare hand can be had here: the detector finds
    no hand in the two photographs, see above): the hull of 21 points, grown around their centre."""
    rng = np.random.default_rng(0)
    points = rng.uniform(100, 200, (21, 2)).tolist()
    mask = region_mask((320, 320), [{"box": [100, 100, 200, 200], "points": points}], "hand", 0.0)
    grown = region_mask((320, 320), [{"box": [100, 100, 200, 200], "points": points}], "hand", 0.5)
    inside = [(round(x), round(y)) for x, y in points]
    assert all(mask[y - 1:y + 2, x - 1:x + 2].any() for x, y in inside)
    assert mask[:95].sum() == 0 and mask[:, :95].sum() == 0 and mask[205:].sum() == 0
    assert grown.sum() > 1.8 * mask.sum() and (grown | mask).sum() == grown.sum()


def test_masks_from_the_writer_feed_a_masked_expert_run_and_expert_effect(detectable, mole_files, tmp_path):
    """The demo world's pictures with their own face and hand masks, written by the writer `prepare --detect` uses
    (detector.write_masks): train-expert --masked_loss reads masks_face/, expert-effect reads masks/."""
    import random

    from comfyui_mole.trainer.demo.world import scene
    from comfyui_mole.trainer.training.detector import write_masks

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        picture = scene(random.Random(i), 64)
        picture.image.save(images / f"scene{i}.png")
        (images / f"scene{i}.caption").write_text(picture.caption)
        write_masks(tmp_path, f"scene{i}", {part: picture.masks[part] for part in ("face", "hand")})
    train = subprocess.run([sys.executable, "-m", "trainer", "train-expert", "--pretrained_model_name_or_path",
                            str(detectable), "--train_data_dir", str(images), "--masked_loss", "--conditioning_data_dir",
                            str(tmp_path / "masks_face"), "--resolution", "64", "--network_dim", "4",
                            "--max_train_steps", "2", "--expert_name", "face", "--output_dir", str(tmp_path / "out"),
                            "--output_name", "face"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "masked loss: 8 image(s) with a mask, 0 without" in train.stdout + train.stderr
    effect = subprocess.run([sys.executable, "-m", "trainer", "expert-effect", "--pretrained_model_name_or_path",
                             str(detectable), "--images", str(images), "--masks", str(tmp_path / "masks"),
                             "--timesteps", "500", "--output_dir", str(tmp_path / "effect"), "--experts",
                             f"face={tmp_path / 'out' / 'face.safetensors'}", f"hand={mole_files['hand']}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert effect.returncode == 0, effect.stderr[-3000:]
    result = json.loads((tmp_path / "effect" / "expert_effect.json").read_text())
    assert result["regions"] == ["face", "hand", "background"] and result["cells"]["face"] > 0
