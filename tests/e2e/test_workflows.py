"""Every shipped workflow through the real server, on the generated test models (files under the names the
workflows expect), at test size; and the committed files are what `python -m trainer workflows` makes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from comfyui_mole.mole_ops import safetensors_io
from comfyui_mole.mole_ops.viz import COLOUR_BAR
from comfyui_mole.trainer.harness.workflows import ABLATION, FOLDER, LOCALE, WORKFLOWS, load_api, node_labels, render

W, H, STEPS = 64, 96, 4


def _load(name: str) -> dict:
    return load_api(name, W, H, STEPS)


def _image(server, outputs, node_id) -> np.ndarray:
    files = server.output_files({node_id: outputs[node_id]})
    assert len(files) == 1
    with Image.open(files[0]) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _node(api: dict, title: str) -> str:
    return next(k for k, v in api.items() if v["_meta"]["title"] == title)


def _base_image(server, api: dict, seed: int) -> np.ndarray:
    """The same graph with Apply MoLE removed (KSampler fed by the checkpoint), for comparison."""
    from comfyui_mole.trainer.harness.workflows import txt2img

    ckpt = api[_node(api, "Load stage-1 checkpoint")]["inputs"]["ckpt_name"]
    sampler = next(v["inputs"] for v in api.values() if v["class_type"] == "KSampler")
    graph = txt2img(ckpt, api[_node(api, "Prompt")]["inputs"]["text"],
                    api[_node(api, "Negative prompt")]["inputs"]["text"], seed=seed, steps=STEPS,
                    cfg=sampler["cfg"], width=W, height=H, prefix="wf_base")
    graph["5"]["inputs"].update(sampler_name=sampler["sampler_name"], scheduler=sampler["scheduler"])
    return _image(server, server.run(graph), "7")


def test_workflow_files_are_current(server):
    object_info = server.get("/object_info")
    assert LOCALE.read_text() == node_labels(object_info), "locales/en/nodeDefs.json is stale: run `python -m " \
        "trainer workflows`"
    assert json.loads(LOCALE.read_text())["MoLE_Apply"]["inputs"]["strength_1"] == {"name": "strength 1 (first expert)"}
    rendered = render(object_info)
    assert sorted(rendered) == sorted(str(p.relative_to(FOLDER)) for p in FOLDER.rglob("*.json"))
    for name, text in rendered.items():
        assert (FOLDER / name).read_text() == text, f"workflows/{name} is stale: run `python -m trainer workflows`"
    assert set(WORKFLOWS) == {Path(n).name.removesuffix(".api.json") for n in rendered if n.endswith(".api.json")}


def test_only_ui_workflows_are_templates_and_each_has_a_thumbnail(server):
    """ComfyUI serves the pack's workflows/ folder as templates: the UI files, each with its picture, and no API
    twin (the frontend cannot open those)."""
    from comfyui_mole.trainer.harness.comfy_server import PACKAGE_DIR_NAME

    listed = server.get("/workflow_templates")[PACKAGE_DIR_NAME]
    assert sorted(listed) == sorted(w.title for w in WORKFLOWS.values())
    for workflow in WORKFLOWS.values():
        with Image.open(workflow.thumbnail) as im:
            assert im.format == "JPEG" and min(im.size) >= 128


def test_txt2img_workflow(server):
    api = _load("mole_sd15_txt2img")
    outputs = server.run(api)
    image = _image(server, outputs, _node(api, "Save image"))
    assert image.shape == (H, W, 3)
    base = _base_image(server, api, api[_node(api, "KSampler")]["inputs"]["seed"])
    assert np.abs(image - base).max() > 0, "MoLE did not change the image"

    grid = _image(server, outputs, _node(api, "Save gate maps (steps x experts)"))
    # 'auto' shows all 4 steps; 2 experts; 12x8 latent maps upscaled 8x (cell 96 px); 2-px gaps
    assert grid.shape == (22 + STEPS * 96 + (STEPS - 1) * 2, 64 + 2 * 64 + 2 + COLOUR_BAR, 3) and grid.std() > 1
    overlay = _image(server, outputs, _node(api, "Save gate overlay"))
    band = int(max(10, min(96, W // 12)) * 1.6)                # the experts' names above their panels
    assert overlay.shape == (H + band, 2 * W + 4, 3) and overlay.std() > 1
    curves = _image(server, outputs, _node(api, "Save gate curves"))
    assert curves.shape == (400, 640, 3) and curves.std() > 1

    saved = sorted((server.base_dir / "output").glob("mole_sd15_trace_*.safetensors"))
    tensors, meta, _ = safetensors_io.read(saved[-1])
    assert tensors["local_cond"].shape == (STEPS, 1, 2, H // 8, W // 8)
    assert json.loads(meta["mole.trace"])["experts"] == ["face", "hand"]


def test_ablation_workflow(server):
    api = _load("mole_sd15_ablation")
    outputs = server.run(api)
    grid = _image(server, outputs, _node(api, "Save ablation grid"))
    rows, cols = 2, 3
    band = (grid.shape[0] - (rows - 1) * 4) // rows - H
    assert grid.shape[1] == cols * W + (cols - 1) * 4 and band > 0
    cells = {}
    for i, (label, _) in enumerate(ABLATION):
        y, x = (i // cols) * (H + band + 4) + band, (i % cols) * (W + 4)
        cells[label] = grid[y:y + H, x:x + W]
        assert (grid[y - band:y, x:x + W] < 128).any(), f"no label text above {label!r}"
    base = _base_image(server, api, api[_node(api, "KSampler: base")]["inputs"]["seed"])
    assert np.abs(cells["base"] - base).max() <= 1     # the grid rounds, Save Image truncates
    for label in ("face only", "hand only", "local", "global", "both"):
        assert np.abs(cells[label] - base).max() > 1, f"{label}: same as the base"
    for a, b in (("face only", "hand only"), ("local", "global"), ("local", "both"), ("global", "both")):
        assert np.abs(cells[a] - cells[b]).max() > 0, f"{a} and {b} gave the same image"


def test_sdxl_three_file_workflow(sdxl_server):
    """The SDXL workflow on the detectable SDXL checkpoint with generated three-file set."""
    api = _load("mole_sdxl_three_files")
    outputs = sdxl_server.run(api)
    assert "Requested to load SDXLClipModel" in sdxl_server.log()   # detected as SDXL by the stock loader
    image = _image(sdxl_server, outputs, _node(api, "Save image"))
    assert image.shape == (H, W, 3)
    base = _base_image(sdxl_server, api, api[_node(api, "KSampler")]["inputs"]["seed"])
    assert np.abs(image - base).max() > 0, "MoLE did not change the SDXL image"
    grid = _image(sdxl_server, outputs, _node(api, "Save gate maps (steps x experts)"))
    assert grid.shape == (22 + STEPS * 96 + (STEPS - 1) * 2, 64 + 2 * 64 + 2 + COLOUR_BAR, 3) and grid.std() > 1


def test_uncertainty_workflow(server):
    api = _load("mole_sd15_uncertainty")
    outputs = server.run(api)
    experts_node, models_node = _node(api, "Expert disagreement"), _node(api, "Epistemic uncertainty")
    (expert_text,) = outputs[experts_node]["text"]
    (model_text,) = outputs[models_node]["text"]
    assert expert_text.startswith("expert disagreement from 2 members") and "not as epistemic" in expert_text
    assert model_text.startswith("epistemic uncertainty from 3 members") and "Fewer than 4 members" in model_text
    for title in ("Save disagreement map", "Save uncertainty map"):
        heat_map = _image(server, outputs, _node(api, title))
        assert heat_map.shape[:2] == (H, W) and heat_map.std() > 1
    assert float(expert_text.split(": ")[1].split(" ")[0]) > 0
    (early_text,) = outputs[_node(api, "Early estimate")]["text"]
    assert early_text.startswith("expert disagreement from 2 members")
    assert _image(server, outputs, _node(api, "Save image")).shape == (H, W, 3)
    assert _image(server, outputs, _node(api, "Save early-estimate map")).std() > 1

    # identical members agree exactly: score 0
    api[models_node]["inputs"]["ensemble"] = ["same", 0]
    api["same"] = {"class_type": "MoLE_EnsembleFromModels", "inputs": {
        "model_1": [_node(api, "Load stage-1 checkpoint"), 0], "model_2": [_node(api, "Load stage-1 checkpoint"), 0]}}
    api[models_node]["inputs"]["seed"] = 43
    (same_text,) = server.run(api)[models_node]["text"]
    assert same_text.startswith("epistemic uncertainty from 2 members: 0.")
    assert float(same_text.split(": ")[1].split(" ")[0]) == 0.0
