"""A shared pack in the real server: Load MoLE Pack shows its card on the node and sends the recommended settings,
Apply MoLE uses them when its recommended input is connected; a pack without a card, or with a malformed card field,
still loads (the field is reported on the node and left out)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from comfyui_mole.mole_ops import card as card_format
from comfyui_mole.mole_ops import pack_file, safetensors_io
from comfyui_mole.trainer.harness.workflows import pack_txt2img

ROOT = Path(__file__).resolve().parents[2]
CARD = ('title = "Crisp hands"\nauthor = "A. Artist"\nlicense = "openrail"\nbase_model = "the test base"\n'
        '[recommended]\nmode = "local"\nstrengths = { face = 0.5 }\nend_percent = 0.8\nsteps = 2\ncfg = 3\n')


def make_pack(mole_files, folder: Path, name: str) -> Path:
    card = folder / f"{name}.toml"
    card.write_text(CARD)
    out = folder / f"{name}.safetensors"
    done = subprocess.run([sys.executable, "-m", "trainer", "pack", "--experts", f"face={mole_files['face']}",
                           f"hand={mole_files['hand']}", "--gates", str(mole_files["gates"]), "--card", str(card),
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def graph(checkpoint: str, pack: str, connected: bool = True) -> dict:
    api = pack_txt2img().api()
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint
        if node["class_type"] == "MoLE_LoadPack":
            inputs["pack"] = pack
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if node["class_type"] == "KSampler":
            inputs["steps"] = 2
        if node["class_type"] == "MoLE_Apply" and not connected:
            del inputs["recommended"]
    return api


def node_ui(outputs: dict, api: dict, class_type: str) -> dict:
    return next(outputs[i] for i, n in api.items() if n["class_type"] == class_type)


def test_load_mole_pack_shows_the_card_and_apply_mole_uses_its_settings(server, detectable, mole_files):
    folder = server.base_dir / "models" / "mole"
    make_pack(mole_files, folder, "crisp_hands")
    api = graph(detectable.name, "crisp_hands.safetensors")
    outputs = server.run(api)
    shown = node_ui(outputs, api, "MoLE_LoadPack")
    assert shown["mole_lines"][1] == "card: Crisp hands by A. Artist, licence openrail", shown
    assert "base: the test base" in shown["mole_lines"] and shown["mole_warnings"] == []
    assert any(line.startswith("recommended: mode local, strengths face 0.5") and "2 steps, CFG 3" in line
               for line in shown["mole_lines"]), shown
    applied = node_ui(outputs, api, "MoLE_Apply")["mole_lines"]
    assert "mode local; acting from 0% to 80% of the steps" in applied[0], applied
    assert any(line.strip().endswith("strength 0.5") and "face" in line for line in applied), applied
    assert any(line.strip().endswith("strength 1") and "hand" in line for line in applied), applied   # widget's
    assert applied[-1].startswith("settings: the pack's recommended ones")
    # not connected: Apply MoLE's own widgets
    api = graph(detectable.name, "crisp_hands.safetensors", connected=False)
    applied = node_ui(server.run(api), api, "MoLE_Apply")["mole_lines"]
    assert "mode both; acting from 0% to 100%" in applied[0] and not applied[-1].startswith("settings:")


def test_a_pack_without_a_card_or_with_a_bad_field_still_loads(server, detectable, mole_files):
    api = graph(detectable.name, "test_pack.safetensors")
    shown = node_ui(server.run(api), api, "MoLE_LoadPack")
    assert "no card" in shown["mole_lines"][1] and shown["mole_warnings"] == []
    folder = server.base_dir / "models" / "mole"
    tensors, meta, _ = safetensors_io.read(make_pack(mole_files, folder, "bad_card"))
    meta["mole.pack_recommended"] = json.dumps({"mode": "sideways"})
    safetensors_io.write(folder / "bad_card.safetensors", tensors, meta)
    assert pack_file.load_card(meta)[0].recommended is None
    api = graph(detectable.name, "bad_card.safetensors")
    outputs = server.run(api)
    shown = node_ui(outputs, api, "MoLE_LoadPack")
    assert shown["mole_warnings"] == ["bad_card.safetensors: card field ignored: mole.pack_recommended: mode "
                                      "'sideways' is not one of both, local, global, none (the recommended settings "
                                      "are left out)"], shown
    assert "mode both" in node_ui(outputs, api, "MoLE_Apply")["mole_lines"][0]      # the widgets' settings
    assert card_format.from_metadata(meta)[0].title == "Crisp hands"


def test_the_stock_lora_loader_ignores_what_it_does_not_know(comfy, detectable, mole_files, tmp_path, caplog):
    """A carded pack in ComfyUI's stock LoRA loader: nothing of it is applied (its keys are the pack's own) and
    nothing fails; the expert files the pack was made from still load there whole."""
    import logging

    import comfy.sd
    import comfy.utils

    pack = make_pack(mole_files, tmp_path, "stock")
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(detectable), output_vae=False, output_clip=True)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(pack), safe_load=True),
                                                   1.0, 1.0)
    assert len(patched.patches) == 0 and "lora key not loaded" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(
            model, clip, comfy.utils.load_torch_file(str(mole_files["face"]), safe_load=True), 1.0, 1.0)
    assert len(patched.patches) > 0 and "lora key not loaded" not in caplog.text
