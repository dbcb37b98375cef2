"""Shared fixtures. Three rings: tests/ops (pure torch, no ComfyUI), tests/host (tiny models in a real
ModelPatcher), tests/e2e (the real server). ComfyUI is imported only inside the fixtures that need it, so the
ops ring never touches it.

The repository is loaded as package `comfyui_mole` (as ComfyUI loads it under its folder name): its code uses
relative imports, and its `nodes/` must never shadow ComfyUI's top-level `nodes` module.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `python -m pytest` puts the working directory on sys.path, where our nodes/ would shadow ComfyUI's `nodes`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
if "comfyui_mole" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("comfyui_mole", ROOT / "__init__.py",
                                                   submodule_search_locations=[str(ROOT)])
    _package = importlib.util.module_from_spec(_spec)
    sys.modules["comfyui_mole"] = _package
    _spec.loader.exec_module(_package)


from comfyui_mole.trainer.harness.workflows import SD15 as WORKFLOW_FILES  # noqa: E402  (after the package exists)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run full-size checks marked slow")
    parser.addoption("--fuzz", type=int, default=0, metavar="N",
                     help="tests/ops/test_fuzz.py: N cases per file format, N/10 per text format, and a table of "
                     "outcomes (make fuzz) instead of the CI-sized budget")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="full-size check: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI importable in this process (CPU, PyTorch attention); returns its folder."""
    from comfyui_mole.trainer.harness.host import use_comfy

    return use_comfy()


@pytest.fixture
def tiny(comfy):
    """ModelPatcher around a ~1M-parameter SD1.5-architecture model with explicitly initialised weights."""
    from comfyui_mole.trainer.harness.tiny_models import tiny_sd15

    return tiny_sd15(seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(comfy):
    """ModelPatcher around a tiny-width model with SDXL's block layout. Clone before patching."""
    from comfyui_mole.trainer.harness.tiny_models import tiny_sdxl

    return tiny_sdxl(seed=0)


@pytest.fixture(scope="session")
def full(comfy):
    """ModelPatcher around the full-size SD1.5 UNet with random weights (use only in tests marked slow)."""
    from comfyui_mole.trainer.harness.tiny_models import full_sd15

    return full_sd15(seed=0)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """Makes temporary folders (module_tmp("name")) that are removed when the test module ends: training runs
    write checkpoints of hundreds of MB each, and the disk must hold the whole suite."""
    made = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A temporary ComfyUI models folder shared by the session."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def detectable(comfy, models_dir) -> Path:
    """The smallest checkpoint the stock CheckpointLoaderSimple detects as SD1.5, written once per session
    into models_dir/checkpoints and registered with folder_paths."""
    import folder_paths
    from comfyui_mole.trainer.harness.tiny_models import write_detectable_checkpoint

    path = write_detectable_checkpoint(models_dir / "checkpoints" / "mole-detectable-sd15.safetensors", seed=0)
    folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    return path


@pytest.fixture(scope="session")
def mole_files(detectable, models_dir) -> dict[str, Path]:
    """Generated face and hand experts (kohya SGM names), their gates and a pack, shaped for the detectable
    checkpoint, in models_dir/mole; plus a gate file for three experts (a mismatch for error tests)."""
    from mole_fakes import fake_expert, fake_gates

    from comfyui_mole.mole_ops import expert_file, gate_file, pack_file
    from comfyui_mole.trainer.harness.tiny_models import layer_shapes, write_stand_in_files

    folder = models_dir / "mole"
    folder.mkdir(parents=True, exist_ok=True)
    files = {role: folder / f"test_{role}.safetensors" for role in ("face", "hand", "gates")}
    experts, gates = write_stand_in_files("SD15", files)
    shapes = layer_shapes("SD15")
    files["pack"] = pack_file.save(folder / "test_pack.safetensors", experts, gates)
    three = [*experts, fake_expert("feet", shapes, rank=8, seed=5)]
    files["gates_three"] = gate_file.save(folder / "test_gates_three.safetensors", fake_gates(three))
    # bad inputs: truncated, a pickle under a .safetensors name, NaN weights, an SDXL expert
    files["truncated"] = folder / "bad_truncated.safetensors"
    files["truncated"].write_bytes(files["face"].read_bytes()[:-1000])
    files["pickle"] = folder / "bad_pickle.safetensors"
    import torch

    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, files["pickle"])
    nan = fake_expert("face", dict(list(shapes.items())[:2]), rank=2)
    next(iter(nan.layers.values())).down[0, 0] = float("nan")
    files["nan"] = folder / "bad_nan.safetensors"
    expert_file.save(files["nan"], nan)
    from mole_fakes import SDXL_DIMS, layer_shapes

    from comfyui_mole.mole_ops.layout import SDXL

    sdxl = dict(list(layer_shapes(SDXL, **SDXL_DIMS).items())[:20])
    files["sdxl"] = folder / "bad_sdxl_expert.safetensors"
    expert_file.save(files["sdxl"], fake_expert("face", sdxl, rank=2), family="SDXL")
    # an expert whose metadata names another base model (a warning, not an error)
    other = expert_file.load(files["face"], "face")
    other.metadata["mole.base_model"] = "unet-sha256:0123456789abcdef"
    files["other_base"] = folder / "other_base_face.safetensors"
    expert_file.save(files["other_base"], other)
    # the names the shipped SD1.5 workflows expect
    for role in ("face", "hand", "gates"):
        files[f"workflow_{role}"] = _link(files[role], folder / WORKFLOW_FILES[role])
    return files


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.link(src, dst)
    return dst


@pytest.fixture(scope="session")
def sdxl_server(comfy, tmp_path_factory):
    """A second real server with the detectable SDXL checkpoint (1.9 GB, ~20 s to write; full-size CLIP-G) and
    generated SDXL experts and gates under the names the SDXL workflow expects."""
    from comfyui_mole.trainer.harness.comfy_server import ComfyServer, prepare_base_dir
    from comfyui_mole.trainer.harness.tiny_models import write_detectable_checkpoint, write_stand_in_files
    from comfyui_mole.trainer.harness.workflows import SDXL

    models = tmp_path_factory.mktemp("sdxl_models")
    checkpoint = write_detectable_checkpoint(models / SDXL["checkpoint"], seed=0, family="SDXL")
    mole = {role: models / SDXL[role] for role in ("face", "hand", "gates")}
    write_stand_in_files("SDXL", mole, rank=4)
    base = prepare_base_dir(tmp_path_factory.mktemp("comfy_sdxl"), {"checkpoints": [checkpoint], "mole": list(mole.values())})
    with ComfyServer(base) as srv:
        yield srv
    for folder in (models, base):   # the checkpoint is hard-linked into both
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def server(detectable, mole_files, tmp_path_factory):
    """The real ComfyUI server (main.py --cpu) on a free loopback port, with this package in custom_nodes and
    the detectable checkpoint in models/checkpoints. Stopped by PID at the end of the session."""
    from comfyui_mole.trainer.harness.comfy_server import ComfyServer, prepare_base_dir

    from comfyui_mole.trainer.harness.workflows import COMMUNITY_LORAS

    checkpoint = _link(detectable, detectable.parent / WORKFLOW_FILES["checkpoint"])
    loras = [_link(mole_files[role], mole_files[role].parent.parent / "loras" / name)
             for role, name in zip(("face", "hand"), COMMUNITY_LORAS)]
    base = prepare_base_dir(tmp_path_factory.mktemp("comfy"),
                            {"checkpoints": [detectable, checkpoint], "mole": list(mole_files.values()),
                             "loras": loras})
    with ComfyServer(base) as srv:
        yield srv


@pytest.fixture(scope="session")
def train_images(tmp_path_factory) -> Path:
    """Eight 64x64 pictures of coloured shapes with kohya caption files (.caption)."""
    import random

    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("train_images")
    rng = random.Random(0)
    colours = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
    for i in range(8):
        fg, bg = rng.sample(sorted(colours), 2)
        shape = rng.choice(["circle", "square"])
        image = Image.new("RGB", (64, 64), colours[bg])
        x, y, r = rng.randint(16, 48), rng.randint(16, 48), rng.randint(8, 14)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colours[fg])
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.caption").write_text(f"a {fg} {shape} on a {bg} background")
    return folder
