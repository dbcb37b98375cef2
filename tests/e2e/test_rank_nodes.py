"""Experts reduced to the rank they use, through the real server: the loaders' rank setting (info on the node,
the picture close to full rank), `python -m trainer resize-experts` files in the stock LoraLoader and in our
loaders, where the gate file trained with the full experts still finds them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_mole.mole_ops import expert_file
from comfyui_mole.trainer.harness.comfy_server import ServerError
from comfyui_mole.trainer.harness.workflows import txt2img

from test_nodes import mole_graph, pixels

ROOT = Path(__file__).resolve().parents[2]


def decaying(src: Path, dst: Path, role: str) -> Path:
    """The stand-in expert with singular values decaying as 0.25 ** i (a trained LoRA's spectrum, steeper)."""
    e = expert_file.load(src, role)
    for w in e.layers.values():
        q_up, _ = torch.linalg.qr(w.up.float())
        q_down, _ = torch.linalg.qr(w.down.float().T)
        s = 0.25 ** torch.arange(w.rank, dtype=torch.float32) * w.up.float().norm()
        w.up, w.down = (q_up * s).to(w.up.dtype), q_down.T.contiguous().to(w.down.dtype)
    expert_file.save(dst, e)
    return dst


@pytest.fixture(scope="module")
def decay_files(server, mole_files):
    folder = server.base_dir / "models" / "mole"
    return {role: decaying(mole_files[role], folder / f"decay_{role}.safetensors", role).name
            for role in ("face", "hand")}


def ui_of(outputs: dict, graph: dict, class_type: str) -> dict:
    return next(outputs[i] for i, n in graph.items() if n["class_type"] == class_type and i in outputs)


def test_loader_rank_setting_reports_ranks_and_error_and_keeps_the_picture(server, detectable, decay_files):
    experts = (decay_files["face"], decay_files["hand"])
    full_graph = mole_graph(detectable.name, experts=experts, mode="none", prefix="rank_full")
    del full_graph["11"], full_graph["12"]["inputs"]["gates"]            # experts at fixed scale: no gate file
    full = pixels(server, server.run(full_graph))
    reduced_graph = mole_graph(detectable.name, experts=experts, mode="none", prefix="rank_99")
    del reduced_graph["11"], reduced_graph["12"]["inputs"]["gates"]
    reduced_graph["10"]["inputs"]["rank"] = "99% energy"
    outputs = server.run(reduced_graph)
    lines = ui_of(outputs, reduced_graph, "MoLE_LoadExperts")["mole_lines"]
    face = next(line for line in lines if line.startswith("face: 99% energy"))
    assert "of 8 on" in face and "delta error max" in face, lines
    kept = int(face.split("rank ")[1].split()[0].split("-")[0])
    assert kept <= 4                                    # 0.25 ** i: four values hold > 99.9% of the energy
    base = pixels(server, server.run(txt2img(detectable.name, "a person waving", seed=5, width=64, height=96,
                                             prefix="rank_base")))
    # the stand-in experts change the random base's picture a lot (mean 33 of 255), and 3 sampling steps amplify
    # any change: the 6% delta error of '99% energy' moves the picture by about a third of that; a rank at or above
    # the experts' own (8) gives the full-rank picture
    change, error = np.abs(full - base).mean(), np.abs(pixels(server, outputs) - full).mean()
    assert change > 1 and error < 0.5 * change, (change, error)
    reduced_graph["10"]["inputs"]["rank"] = "16"
    next(n for n in reduced_graph.values() if n["class_type"] == "SaveImage")["inputs"]["filename_prefix"] = "rank_16"
    assert np.abs(pixels(server, server.run(reduced_graph)) - full).max() <= 1
    with pytest.raises(ServerError, match="input rank is 'most': choose one of full, 99% energy"):
        reduced_graph["10"]["inputs"]["rank"] = "most"
        server.run(reduced_graph)


def test_resized_files_load_in_the_stock_lora_loader_and_find_their_gates(server, detectable, mole_files):
    folder = server.base_dir / "models" / "mole"
    loras = server.base_dir / "models" / "loras"
    for role in ("face", "hand"):
        done = subprocess.run([sys.executable, "-m", "trainer", "resize-experts", "--model", str(mole_files[role]),
                               "--save_to", str(folder / f"resized_{role}.safetensors"), "--new_rank", "4"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "rank 4: rank 4 of 8 on" in done.stderr and "delta error max" in done.stderr, done.stderr[-2000:]
        (loras / f"resized_{role}.safetensors").hardlink_to(folder / f"resized_{role}.safetensors")
    resized = expert_file.load(folder / "resized_face.safetensors", "face")
    assert resized.ranks == {4} and resized.source["sha256"] == expert_file.load(mole_files["face"], "face").sha256

    # stock LoraLoader: loads every key (ComfyUI logs "lora key not loaded" for any it cannot map)
    stock = txt2img(detectable.name, "a person waving", seed=5, width=64, height=96, prefix="rank_stock")
    stock["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name":
                   "resized_face.safetensors", "strength_model": 1.0, "strength_clip": 1.0}}
    stock["5"]["inputs"]["model"] = ["20", 0]
    log_before = server.log_path.read_text(errors="replace")
    base = pixels(server, server.run(txt2img(detectable.name, "a person waving", seed=5, width=64, height=96,
                                             prefix="rank_stock_base")))
    assert np.abs(pixels(server, server.run(stock)) - base).max() > 0
    assert "lora key not loaded" not in server.log_path.read_text(errors="replace")[len(log_before):]

    # our loaders, with the gate file trained on the full experts: no mismatch, no warning
    graph = mole_graph(detectable.name, experts=("resized_face.safetensors", "resized_hand.safetensors"),
                       prefix="rank_resized")
    outputs = server.run(graph)
    assert ui_of(outputs, graph, "MoLE_Apply")["mole_warnings"] == []
    assert np.abs(pixels(server, outputs) - base).max() > 0
    lines = ui_of(outputs, graph, "MoLE_LoadExperts")["mole_lines"]
    assert any("rank 4 of 8, alpha" in line and "(rank 4)" in line for line in lines), lines
