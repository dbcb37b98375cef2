"""The evaluation's model list (TOML) and the graph it makes per model: the shipped txt2img workflow's."""
from pathlib import Path

import pytest

from comfyui_mole.trainer.benchmarks import models as M
from comfyui_mole.trainer.harness.workflows import load_api
from comfyui_mole.trainer.training.config import ConfigError

VIEWS = {"PreviewAny", "MoLE_GateMaps", "MoLE_GateCurves", "MoLE_SaveTrace"}


@pytest.fixture
def files(tmp_path):
    for name in ("base.safetensors", "face.safetensors", "hand.safetensors", "gates.safetensors", "pack.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "face.safetensors").write_bytes(b"y")
    return tmp_path


def write(folder, text):
    path = folder / "models.toml"
    path.write_text(text)
    return path


FULL = """
reference = "base"
[[model]]
name = "base"
checkpoint = "base.safetensors"
[[model]]
name = "fixed 0.5"
checkpoint = "base.safetensors"
experts = ["face.safetensors", "other/face.safetensors"]
mode = "none"
strengths = [0.5, 0.5]
[[model]]
name = "MoLE"
checkpoint = "base.safetensors"
experts = ["face.safetensors", "hand.safetensors"]
gates = "gates.safetensors"
[[model]]
name = "pack local"
checkpoint = "base.safetensors"
pack = "pack.safetensors"
mode = "local"
[[model]]
name = "authors"
checkpoint = "base.safetensors"
set = ["face.safetensors", "hand.safetensors", "gates.safetensors"]
mode = "global"
"""


def test_a_full_model_list_parses_with_paths_relative_to_the_file(files):
    specs = M.load(write(files, FULL))
    assert [m.name for m in specs.models] == ["base", "fixed 0.5", "MoLE", "pack local", "authors"]
    base, fixed, mole, pack, authors = specs.models
    assert base.checkpoint == files / "base.safetensors" and base.mode == "none" and not base.experts
    assert fixed.roles == ("face", "hand") and fixed.strengths == (0.5, 0.5) and fixed.mode == "none"
    assert mole.mode == "both" and mole.gates == files / "gates.safetensors"
    assert pack.mode == "local" and authors.set[2] == files / "gates.safetensors"
    assert len({m.slug for m in specs.models}) == 5


@pytest.mark.parametrize("body, message", [
    ('[[model]]\nname = "a"\ncheckpoint = "base.safetensors"\nlora = "x"\n', "unknown keys \\['lora'\\]"),
    ('[[model]]\nname = "a"\ncheckpoint = "missing.safetensors"\n', "missing.safetensors does not exist"),
    ('[[model]]\nname = "a"\ncheckpoint = "base.safetensors"\ngates = "gates.safetensors"\n',
     "gates need their experts"),
    ('[[model]]\nname = "a"\ncheckpoint = "base.safetensors"\nexperts = ["face.safetensors"]\nmode = "both"\n',
     "mode 'both' needs gates"),
    ('[[model]]\nname = "a"\ncheckpoint = "base.safetensors"\nexperts = ["face.safetensors"]\nmode = "max"\n',
     "mode must be one of"),
    ('[[model]]\nname = "a"\ncheckpoint = "base.safetensors"\n[[model]]\nname = "a"\ncheckpoint = '
     '"base.safetensors"\n', "model names must differ"),
    ('reference = "zz"\n[[model]]\nname = "a"\ncheckpoint = "base.safetensors"\n', "reference 'zz' is not"),
    ('[[model]]\ncheckpoint = "base.safetensors"\n', "needs a name"),
    ('[[model]]\nname = "a"\ncheckpoint = "base.safetensors"\npack = "pack.safetensors"\nexperts = '
     '["face.safetensors"]\n', "one of experts, pack or set"),
    ('title = "x"\n', "no \\[\\[model\\]\\] tables"),
    ('[[model]\n', "not valid TOML"),
])
def test_bad_model_lists_are_refused_naming_the_file_and_model(files, body, message):
    path = write(files, body)
    with pytest.raises(ConfigError, match=message) as e:
        M.load(path)
    assert str(path) in str(e.value)


def graph_of(files, name):
    specs = M.load(write(files, FULL))
    names = M.server_names(specs.models)
    return M.graph(specs.by_name[name], names, "a woman", "blurry", 7, 64, 64, M.shipped_sampler(), "p"), names


def test_the_mole_graph_is_the_shipped_txt2img_workflow_without_its_gate_views(files):
    api, _ = graph_of(files, "MoLE")
    shipped = load_api("mole_sd15_txt2img")
    kinds = {n["class_type"] for n in shipped.values() if n["class_type"] not in VIEWS}
    assert {n["class_type"] for n in api.values()} == kinds and len(api) == 10
    sampler = next(n for n in api.values() if n["class_type"] == "KSampler")["inputs"]
    shipped_sampler = next(n for n in shipped.values() if n["class_type"] == "KSampler")["inputs"]
    for key in ("steps", "cfg", "sampler_name", "scheduler", "denoise"):
        assert sampler[key] == shipped_sampler[key]
    assert sampler["seed"] == 7
    apply = next(n for n in api.values() if n["class_type"] == "MoLE_Apply")["inputs"]
    shipped_apply = next(n for n in shipped.values() if n["class_type"] == "MoLE_Apply")["inputs"]
    assert set(apply) == set(shipped_apply) and apply["mode"] == "both"


def test_each_kind_of_model_gets_its_loaders(files):
    base, _ = graph_of(files, "base")
    assert not any(n["class_type"].startswith("MoLE_") for n in base.values())
    fixed, names = graph_of(files, "fixed 0.5")
    apply = next(n for n in fixed.values() if n["class_type"] == "MoLE_Apply")["inputs"]
    assert "gates" not in apply and apply["mode"] == "none" and apply["strength_1"] == 0.5
    loader = next(n for n in fixed.values() if n["class_type"] == "MoLE_LoadExperts")["inputs"]
    assert loader["expert_1"] != loader["expert_2"], "two files named face.safetensors must not collide"
    assert names[(files / "other" / "face.safetensors").resolve()][1].startswith("face-")
    pack, _ = graph_of(files, "pack local")
    assert any(n["class_type"] == "MoLE_LoadPack" for n in pack.values())
    authors, _ = graph_of(files, "authors")
    loader = next(n for n in authors.values() if n["class_type"] == "MoLE_LoadSet")["inputs"]
    assert (loader["role_1"], loader["role_2"], loader["gate_file"]) == ("face", "hand", "gates.safetensors")


def test_the_in_world_scorer_splits_a_pictures_error_by_region():
    import numpy as np
    import torch

    from comfyui_mole.trainer.benchmarks.heldout import region_losses
    from comfyui_mole.trainer.training.expert_effect import Picture

    face = np.zeros((64, 64), bool)
    face[:16, :16] = True                                  # latent cells (0..1, 0..1) of an 8x8 map
    hand = np.zeros((64, 64), bool)
    hand[40:56, 40:43] = True                              # 3/8 of a cell wide: no hand cell at all
    errors = torch.zeros(8, 8)
    errors[:2, :2] = 1.0                                   # an expert that changes the face only
    row = region_losses(errors, Picture(Path("x.png"), "a face", {"face": face, "hand": hand}), ["face", "hand"])
    assert float(row["loss"]) == pytest.approx(4 / 64) and float(row["loss_face"]) == 1.0
    assert row["loss_hand"] == "" and float(row["loss_background"]) == 0.0


def test_demo_sized_graphs_take_the_demo_samplers_steps_and_guidance_scale():
    """The demo samples at its recipe's steps and CFG (the sampler study's pick) in the API graph and in the UI
    workflow alike; the shipped files keep their own settings for real SD1.5 files."""
    import json

    from comfyui_mole.trainer.demo.pipeline import FULL
    from comfyui_mole.trainer.harness.workflows import WORKFLOWS, resize_ui

    shipped = next(n for n in load_api("mole_sd15_txt2img").values() if n["class_type"] == "KSampler")["inputs"]
    api = load_api("mole_sd15_txt2img", 64, 64, FULL.sample_steps, cfg=FULL.cfg)
    sampler = next(n for n in api.values() if n["class_type"] == "KSampler")["inputs"]
    assert (sampler["steps"], sampler["cfg"]) == (FULL.sample_steps, FULL.cfg) == (10, 3.0)
    assert (shipped["steps"], shipped["cfg"]) == (50, 7.5)
    ui = resize_ui(json.loads(WORKFLOWS["mole_sd15_txt2img"].ui_path.read_text()), 64, 64, FULL.sample_steps,
                   cfg=FULL.cfg)
    widgets = next(n for n in ui["nodes"] if n["type"] == "KSampler")["widgets_values"]
    assert widgets[2:6] == [10, 3.0, "ddim", "ddim_uniform"]
