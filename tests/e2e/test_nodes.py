"""MoLE nodes through the real server: apply generated experts and gates to the detectable checkpoint."""
import numpy as np
import pytest
from PIL import Image

from comfyui_mole.trainer.comfy_server import ServerError
from comfyui_mole.trainer.graphs import txt2img


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
