"""A newcomer's first ten minutes, through the real server: every mistake an artist makes first gives a message
in the UI (the node's UI text in /history, or the error in /history's status) that names the file, and the
server keeps serving."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_mole.trainer.harness.comfy_server import ComfyServer, ServerError, prepare_base_dir
from comfyui_mole.trainer.harness.workflows import WORKFLOWS, api_path, txt2img

ROOT = Path(__file__).resolve().parents[2]


def graph(checkpoint, experts=("test_face.safetensors", "test_hand.safetensors"), gates="test_gates.safetensors",
          mode="both", start=0.0, end=1.0, record=False, cfg=7.0, prefix="first"):
    g = txt2img(checkpoint, "a person waving", seed=5, width=64, height=64, cfg=cfg, prefix=prefix)
    g["10"] = {"class_type": "MoLE_LoadExperts", "inputs": {
        "expert_1": experts[0], "role_1": "face", "expert_2": experts[1], "role_2": "hand",
        "expert_3": "(none)", "role_3": ""}}
    g["12"] = {"class_type": "MoLE_Apply", "inputs": {
        "model": ["1", 0], "experts": ["10", 0], "mode": mode, "strength_1": 1.0, "strength_2": 0.5,
        "strength_3": 1.0, "start_percent": start, "end_percent": end, "record_trace": record}}
    if gates:
        g["11"] = {"class_type": "MoLE_LoadGates", "inputs": {"experts": ["10", 0], "gate_file": gates}}
        g["12"]["inputs"]["gates"] = ["11", 0]
    g["5"]["inputs"]["model"] = ["12", 0]
    return g


def info(server, g) -> str:
    """Apply MoLE's UI text of a run (what the node shows, and its `info` output)."""
    (text,) = server.wait(server.queue(g))["outputs"]["12"]["text"]
    return text


def test_a_fresh_comfyui_gets_a_mole_folder_and_the_loaders_list_loras(tmp_path, detectable, mole_files):
    base = prepare_base_dir(tmp_path / "fresh", {"checkpoints": [detectable], "loras": [mole_files["face"]]})
    assert not (base / "models" / "mole").exists()
    with ComfyServer(base) as server:
        assert (base / "models" / "mole").is_dir()
        experts = server.get("/object_info/MoLE_LoadExperts")["MoLE_LoadExperts"]["input"]["required"]
        assert experts["expert_1"][1]["options"] == [mole_files["face"].name]   # from models/loras


def test_apply_mole_says_what_it_attached(server, detectable):
    text = info(server, graph(detectable.name, prefix="first_info"))
    assert text.startswith("MoLE: 2 expert(s) on 36 layers (SD15); gates: official variant from "
                           "test_gates.safetensors; mode both")
    assert "strength_1 -> face: test_face.safetensors (rank 8, alpha 8.0), strength 1" in text
    assert "strength_2 -> hand: test_hand.safetensors (rank 8, alpha 8.0), strength 0.5" in text
    assert "WARNING" not in text


def test_swapped_experts_and_another_base_are_warned_in_the_ui(server, detectable, mole_files):
    text = info(server, graph(detectable.name, experts=("test_hand.safetensors", "test_face.safetensors"),
                              prefix="first_swap"))
    warnings = [line for line in text.splitlines() if line.startswith("WARNING: ")]
    # one warning per swapped file, with both signs: its own metadata and the gate file's record of it
    assert len(warnings) == 2, text
    assert any("test_hand.safetensors is loaded as 'face', but it was trained as the 'hand' expert and the gates in"
               in w and "were trained with it as 'hand': swapped files?" in w for w in warnings), text
    assert any("test_face.safetensors is loaded as 'hand', but it was trained as the 'face' expert" in w
               for w in warnings), text
    # every warning of the log reaches the node's UI data (web/mole.js draws it), with file names, not paths, also
    # when the MoLE of these files is already built (a second run at another strength): here a face file that is
    # not the one the gates were trained with (its weights changed, its role kept)
    from comfyui_mole.mole_ops import expert_file

    retrained = expert_file.load(mole_files["face"], "face")
    for layer in retrained.layers.values():
        layer.up.mul_(1.01)
    expert_file.save(server.base_dir / "models" / "mole" / "retrained_face.safetensors", retrained)
    for strength in (0.9, 0.75):
        g = graph(detectable.name, experts=("retrained_face.safetensors", "test_hand.safetensors"),
                  prefix="first_sha")
        g["12"]["inputs"]["strength_1"] = strength
        ui = server.wait(server.queue(g))["outputs"]["12"]
        shown = ui["mole_warnings"]
        assert len(shown) == 1 and shown[0].startswith(
            "expert 'face' (retrained_face.safetensors) is not the file the gates were trained with"), shown
        assert all("/" not in w for w in shown), shown
        assert ui["mole_lines"][0].startswith("MoLE: 2 expert(s)"), ui
    text = info(server, graph(detectable.name, experts=("other_base_face.safetensors", "test_hand.safetensors"),
                              gates=None, mode="none", prefix="first_base"))
    assert any("other_base_face.safetensors" in w and "another base model" in w for w in text.splitlines()
               if w.startswith("WARNING: ")), text


def test_start_after_end_is_refused_at_node_time(server, detectable):
    with pytest.raises(ServerError, match=r"start_percent 0.8 is after end_percent 0.2: MoLE would never act"):
        server.run(graph(detectable.name, start=0.8, end=0.2, prefix="first_range"))
    assert "MoLE_Apply" in server.get("/object_info/MoLE_Apply")


def test_an_unnamed_expert_slot_is_refused(server, detectable):
    g = graph(detectable.name, prefix="first_role")
    g["10"]["inputs"].update(expert_3="test_face.safetensors", role_3=" ")
    with pytest.raises(ServerError, match=r"expert_3 \(test_face.safetensors\) has no role name"):
        server.run(g)


def test_uncond_rows_at_cfg_1_give_a_clear_error(server, detectable):
    for node, kind in (("MoLE_GateMaps", "maps"), ("MoLE_GateCurves", "curves")):
        g = graph(detectable.name, record=True, cfg=1.0, prefix=f"first_cfg1_{kind}")
        inputs = {"trace": ["12", 1], "images": ["6", 0], "image_index": 0, "rows": "uncond"}
        if node == "MoLE_GateMaps":
            inputs["steps"] = "auto"
        g["20"] = {"class_type": node, "inputs": inputs}
        g["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "first_cfg1"}}
        with pytest.raises(ServerError, match=r"holds no uncond rows: at CFG 1 the sampler skips the negative"):
            server.run(g)


def test_an_expert_of_other_widths_is_named_in_the_error(server, detectable, mole_files):
    """An expert with the right layer names but other widths (made for another base), without gates."""
    from comfyui_mole.mole_ops import expert_file
    from comfyui_mole.mole_ops.expert_file import LoRAWeights

    face = expert_file.load(mole_files["face"], "face")
    for name, w in face.layers.items():
        face.layers[name] = LoRAWeights(w.down.new_zeros(w.down.shape[0], w.down.shape[1] + 8), w.up, w.alpha, w.conv)
    wide = server.base_dir / "models" / "mole" / "wider_face.safetensors"
    expert_file.save(wide, face)
    with pytest.raises(ServerError, match=r"the experts map different widths \(face = .*wider_face.safetensors: "
                                          r"328 -> 320, hand = .*test_hand.safetensors: 320 -> 320\)"):
        server.run(graph(detectable.name, experts=(wide.name, "test_hand.safetensors"), gates=None, mode="none",
                         prefix="first_wide"))
    with pytest.raises(ServerError, match=r"the experts \(face = .*wider_face.safetensors, hand = .*"
                                          r"wider_face.safetensors\) map 328 -> 320; they were made for another base"):
        server.run(graph(detectable.name, experts=(wide.name, wide.name), gates=None, mode="none",
                         prefix="first_wide2"))
    assert "MoLE_Apply" in server.get("/object_info/MoLE_Apply")


def test_inputs_say_which_expert_they_scale_and_the_third_slot_is_free(server):
    info_ = server.get("/object_info/MoLE_Apply")["MoLE_Apply"]
    strengths = info_["input"]["required"]
    assert "first expert" in strengths["strength_1"][1]["tooltip"] and "face" in strengths["strength_1"][1]["tooltip"]
    assert "second expert" in strengths["strength_2"][1]["tooltip"]
    assert info_["output_name"][2] == "info"
    loader = server.get("/object_info/MoLE_LoadExperts")["MoLE_LoadExperts"]["input"]["required"]
    assert loader["role_3"][1]["default"] == ""


def test_the_uncertainty_workflow_explains_its_fine_tunes():
    api = api_path("mole_sd15_uncertainty").read_text()
    assert "any fine-tune LoRA of this base (models/loras)" in api
    note = WORKFLOWS["mole_sd15_uncertainty"].note
    assert "independent fine-tunes" in note and "without them this branch reports a missing file" in note


def test_training_logs_in_a_file_have_plain_progress_lines(detectable, train_images, tmp_path):
    """Outside a terminal the progress bars print a plain line every few seconds, no carriage returns."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "trainer", "train-expert", "--pretrained_model_name_or_path",
                           str(detectable), "--train_data_dir", str(train_images), "--resolution", "64",
                           "--max_train_steps", "40", "--network_dim", "4", "--output_dir", str(tmp_path),
                           "--output_name", "e", "--cache_latents"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr
    steps = [line for line in done.stderr.splitlines() if line.startswith("train-expert:") and "|" in line]
    assert steps[-1].startswith("train-expert: 100%") and "40/40" in steps[-1]
    assert 2 <= len(steps) <= 12, steps         # the first line, one every 5 s, the last
