"""`python -m trainer prepare` with the CLIP score filter, on a tiny randomly initialised Hugging Face CLIP
(the user's real CLIP model is a folder of the same layout): scores are computed for every crop, crops below the
threshold are dropped and reported, and the histogram is drawn."""
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from comfyui_mole.trainer.harness.host import comfyui_path

ROOT = Path(__file__).resolve().parents[2]


def tiny_clip(folder: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(comfyui_path() / "comfy" / "sd1_tokenizer")
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def test_prepare_with_clip_score_filter(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(6):
        Image.new("RGB", (160 + 40 * i, 128), (40 * i, 200 - 30 * i, 90)).save(raw / f"p{i}.jpg")
        (raw / f"p{i}.caption").write_text(f"The image depicts a person number {i} raising a hand")
    clip = tiny_clip(tmp_path / "clip")
    command = [sys.executable, "-m", "trainer", "prepare", "--input_dir", str(raw), "--output_dir",
               str(tmp_path / "all"), "--window", "128", "--size", "64", "--clip_model", str(clip)]
    shown = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-3000:]
    scores = json.loads((tmp_path / "all" / "prepare_report.json").read_text())["clip_scores"]
    assert scores["n"] == 15 and scores["min"] < scores["max"]          # 2+2+2+3+3+3 windows, all kept
    threshold = scores["median"]
    command[command.index(str(tmp_path / "all"))] = str(tmp_path / "filtered")
    filtered = subprocess.run(command + ["--clip_threshold", str(threshold)], cwd=ROOT, capture_output=True, text=True)
    assert filtered.returncode == 0, filtered.stderr[-3000:]
    report = json.loads((tmp_path / "filtered" / "prepare_report.json").read_text())
    dropped = report["dropped_crops"][f"CLIP score below {threshold:g}"]
    assert 0 < dropped < 15 and report["written"] == 15 - dropped
    assert len(json.loads((tmp_path / "filtered" / "metadata.json").read_text())) == report["written"]
    assert (tmp_path / "filtered" / "clip_scores.png").stat().st_size > 5000
    assert "## CLIP scores" in (tmp_path / "filtered" / "prepare_report.md").read_text()
    meta = json.loads((tmp_path / "all" / "metadata.json").read_text())
    assert meta["p0_0"]["caption"] == "a person number 0 raising a hand"
