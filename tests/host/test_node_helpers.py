"""Small helpers of the nodes (they import ComfyUI's node API, hence the host ring)."""
import pytest


def test_parse_steps(comfy):
    from comfyui_mole.mole_ops.errors import MoLEError
    from comfyui_mole.nodes.visualise import parse_steps

    assert parse_steps("auto", 4) == [0, 1, 2, 3]
    assert parse_steps("auto", 50) == [0, 10, 20, 29, 39, 49]
    assert parse_steps("all", 3) == [0, 1, 2] and parse_steps(" 0, 2 ", 3) == [0, 2]
    with pytest.raises(MoLEError, match=r"steps \[7\] are outside 0..2"):
        parse_steps("0,7", 3)
    with pytest.raises(MoLEError, match="give 'all', 'auto' or step numbers"):
        parse_steps("first", 3)


def test_node_report_catches_this_threads_mole_warnings_and_shows_file_names(comfy):
    import logging
    import threading

    from comfyui_mole.nodes.report import caught_warnings, file_names, node_ui

    log = logging.getLogger("mole")
    with caught_warnings() as caught:
        log.warning("MoLE: /models/mole/a b/face.safetensors was trained as 'hand'")
        log.info("MoLE: not a warning")
        other = threading.Thread(target=lambda: log.warning("MoLE: another prompt's warning"))
        other.start()
        other.join()
        logging.getLogger("elsewhere").warning("another pack's warning")
    log.warning("MoLE: after the block")
    assert caught == ["/models/mole/a b/face.safetensors was trained as 'hand'"]
    assert file_names(caught[0]) == "face.safetensors was trained as 'hand'"
    assert file_names(r"C:\Users\Jo Do\m\x y.safetensors is loaded; face/hand, /m/g.safetensors.") == \
        "x y.safetensors is loaded; face/hand, g.safetensors."
    assert file_names(r"C:\ComfyUI\models\mole\hand.safetensors and /x/y/gates.safetensors (sha256)") == \
        "hand.safetensors and gates.safetensors (sha256)"
    assert file_names("expert 'face' (/a/b/f.safetensors) is not") == "expert 'face' (f.safetensors) is not"
    text, ui = node_ui(["MoLE: 2 expert(s)", "  face: /m/face.safetensors"],
                       ["w /m/x.safetensors", "w /m/x.safetensors"])
    assert text == "MoLE: 2 expert(s)\n  face: /m/face.safetensors\nWARNING: w /m/x.safetensors"
    assert ui == {"text": [text], "mole_lines": ["MoLE: 2 expert(s)", "  face: face.safetensors"],
                  "mole_warnings": ["w x.safetensors"]}
