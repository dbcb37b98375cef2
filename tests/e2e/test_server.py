"""The real ComfyUI server with this package in custom_nodes (the end-to-end ring)."""
from PIL import Image

from comfyui_mole.trainer.harness.comfy_server import PACKAGE_DIR_NAME
from comfyui_mole.trainer.harness.workflows import txt2img


def test_package_imports_and_registers_every_node(server, comfy):
    import asyncio

    from comfyui_mole.nodes import MoLEExtension

    log = server.log()
    assert f"custom_nodes/{PACKAGE_DIR_NAME}" in log, log[-3000:]
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACKAGE_DIR_NAME in line]
    assert not failed, failed
    info = server.get("/object_info")
    for node in asyncio.run(MoLEExtension().get_node_list()):
        node_id = node.GET_SCHEMA().node_id
        assert node_id in info, f"{node_id} missing from /object_info"
        assert node_id.startswith("MoLE_")


def test_txt2img_through_the_api_saves_a_png(server, detectable):
    outputs = server.run(txt2img(detectable.name, "a person raising a hand", seed=3, width=64, height=64,
                                 prefix="e2e_txt2img"))
    files = server.output_files(outputs)
    assert len(files) == 1 and files[0].suffix == ".png"
    with Image.open(files[0]) as im:
        assert im.size == (64, 64)


def test_invalid_graph_is_refused_and_server_keeps_serving(server):
    import pytest

    from comfyui_mole.trainer.harness.comfy_server import ServerError

    with pytest.raises(ServerError, match="400"):
        server.queue({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert "KSampler" in server.get("/object_info/KSampler")
