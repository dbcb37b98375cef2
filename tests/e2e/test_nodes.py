"""MoLE nodes through the real server: apply generated experts and gates to the detectable checkpoint."""
import numpy as np
import pytest
from PIL import Image

from comfyui_mole.mole_ops.viz import COLOUR_BAR

from comfyui_mole.trainer.harness.comfy_server import ServerError
from comfyui_mole.trainer.harness.workflows import txt2img


def mole_graph(checkpoint, experts=("test_face.safetensors", "test_hand.safetensors"), gates="test_gates.safetensors",
               mode="both", seed=5, prefix="e2e_mole"):
    graph = txt2img(checkpoint, "a person waving", seed=seed, width=64, height=96, prefix=prefix)
    graph["10"] = {"class_type": "MoLE_LoadExperts", "inputs": {
        "expert_1": experts[0], "role_1": "face", "expert_2": experts[1], "role_2": "hand",
        "expert_3": "(none)", "role_3": "feet"}}
    graph["11"] = {"class_type": "MoLE_LoadGates", "inputs": {"experts": ["10", 0], "gate_file": gates}}
    graph["12"] = {"class_type": "MoLE_Apply", "inputs": {
        "model": ["1", 0], "experts": ["10", 0], "gates": ["11", 0], "mode": mode, "strength_1": 1.0,
        "strength_2": 1.0, "strength_3": 1.0, "start_percent": 0.0, "end_percent": 1.0, "record_trace": False}}
    graph["5"]["inputs"]["model"] = ["12", 0]
    return graph


def pixels(server, outputs):
    files = server.output_files(outputs)
    assert len(files) == 1
    with Image.open(files[0]) as im:
        return np.asarray(im).astype(np.int16)


def test_apply_mole_changes_the_image_and_base_stays_the_same(server, detectable):
    base = pixels(server, server.run(txt2img(detectable.name, "a person waving", seed=5, width=64, height=96,
                                             prefix="e2e_base")))
    mole = pixels(server, server.run(mole_graph(detectable.name)))
    base_again = pixels(server, server.run(txt2img(detectable.name, "a person waving", seed=5, width=64,
                                                   height=96, prefix="e2e_base2")))
    assert mole.shape == base.shape == (96, 64, 3)
    assert np.abs(mole - base).max() > 0
    assert np.array_equal(base, base_again)


def test_gates_for_other_experts_fail_clearly_and_server_keeps_serving(server, detectable):
    with pytest.raises(ServerError, match="gate columns are \\['face', 'hand', 'feet'\\]"):
        server.run(mole_graph(detectable.name, gates="test_gates_three.safetensors", prefix="e2e_bad"))
    with pytest.raises(ServerError, match="no such file|not a valid|not a kohya|not gate keys"):
        server.run(mole_graph(detectable.name, gates="test_face.safetensors", prefix="e2e_bad2"))
    assert "MoLE_Apply" in server.get("/object_info/MoLE_Apply")


def test_gate_maps_and_trace_through_the_server(server, detectable):
    graph = mole_graph(detectable.name, prefix="e2e_traced")
    graph["12"]["inputs"]["record_trace"] = True
    graph["20"] = {"class_type": "MoLE_GateMaps", "inputs": {"trace": ["12", 1], "images": ["6", 0], "steps": "all",
                                                             "image_index": 0, "rows": "cond"}}
    graph["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "e2e_grid"}}
    graph["22"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 1], "filename_prefix": "e2e_overlay"}}
    graph["23"] = {"class_type": "MoLE_SaveTrace", "inputs": {"trace": ["12", 1], "images": ["6", 0],
                                                              "filename_prefix": "e2e_trace"}}
    outputs = server.run(graph)
    grid = np.asarray(Image.open(server.output_files({"21": outputs["21"]})[0])).astype(float)
    over = np.asarray(Image.open(server.output_files({"22": outputs["22"]})[0])).astype(float)
    # 4 steps x 2 experts of a 12x8 latent map, upscaled 8x (cell 96 px), 2-pixel gaps
    assert grid.shape == (22 + 4 * 96 + 3 * 2, 64 + 2 * 64 + 2 + COLOUR_BAR, 3) and grid.std() > 1   # + label bands
    assert over.shape == (96 + 16, 2 * 64 + 4, 3) and over.std() > 1     # the experts' names above, a 4-px gap
    saved = list((server.base_dir / "output").glob("e2e_trace_*.safetensors"))
    assert len(saved) == 1
    from comfyui_mole.mole_ops import safetensors_io

    tensors, meta, _ = safetensors_io.read(saved[0])
    assert tensors["local_cond"].shape == (4, 1, 2, 12, 8) and tensors["global_uncond"].shape == (4, 1, 2)


@pytest.mark.parametrize("bad,message", [
    ("bad_truncated.safetensors", "bad_truncated.safetensors: not a (valid )?safetensors file, or truncated"),
    ("bad_pickle.safetensors", "bad_pickle.safetensors: a pickle checkpoint"),
    ("bad_nan.safetensors", "bad_nan.safetensors: tensor .* holds NaN"),
    ("bad_sdxl_expert.safetensors", "do not exist in a SD15 UNet"),
])
def test_bad_expert_files_fail_clearly_and_server_keeps_serving(server, detectable, bad, message):
    with pytest.raises(ServerError, match=message):
        server.run(mole_graph(detectable.name, experts=(bad, "test_hand.safetensors"), prefix="e2e_badfile"))
    assert "MoLE_Apply" in server.get("/object_info/MoLE_Apply")


def test_expert_for_another_base_warns_in_the_log(server, detectable):
    before = server.log()
    pixels(server, server.run(mole_graph(detectable.name, experts=("other_base_face.safetensors",
                                                                   "test_hand.safetensors"), prefix="e2e_other")))
    new = server.log()[len(before):]
    assert "other_base_face.safetensors) was trained on another base model" in new
    assert "test_hand.safetensors) was trained on another base" not in new


def test_three_file_set_and_fixed_scale_expert(server, detectable):
    graph = mole_graph(detectable.name, prefix="e2e_set")
    graph["10"] = {"class_type": "MoLE_LoadSet", "inputs": {
        "expert_1": "test_face.safetensors", "role_1": "face", "expert_2": "test_hand.safetensors", "role_2": "hand",
        "gate_file": "test_gates.safetensors"}}
    graph["12"]["inputs"]["gates"] = ["10", 1]
    del graph["11"]
    from_set = pixels(server, server.run(graph))
    assert np.array_equal(from_set, pixels(server, server.run(mole_graph(detectable.name, prefix="e2e_set2"))))

    fixed = txt2img(detectable.name, "a person waving", seed=5, width=64, height=96, prefix="e2e_fixed")
    fixed["10"] = {"class_type": "MoLE_ExpertFixedScale", "inputs": {
        "model": ["1", 0], "expert": "test_face.safetensors", "strength": 1.0}}
    fixed["5"]["inputs"]["model"] = ["10", 0]
    base = pixels(server, server.run(txt2img(detectable.name, "a person waving", seed=5, width=64, height=96,
                                             prefix="e2e_fixed_base")))
    assert np.abs(pixels(server, server.run(fixed)) - base).max() > 0
    with pytest.raises(ServerError, match="expert role names must differ"):
        graph["10"]["inputs"]["role_2"] = "face"
        server.run(graph)
