"""A shared MoLE's card (mole_ops/card.py) and `python -m trainer pack`'s files: the card TOML read strictly, a
pack's card read leniently (a bad field is reported and left out, never a failed load), the thumbnail's limits, the
round trip pack -> load -> the same tensors and settings, and the model card's front matter and links."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mole_fakes import SD15_DIMS, fake_expert, fake_gates, layer_shapes
from PIL import Image

from comfyui_mole.mole_ops import card as card_format
from comfyui_mole.mole_ops import expert_file, gate_file, pack_file
from comfyui_mole.mole_ops.errors import FormatError
from comfyui_mole.mole_ops.layout import SD15

ROOT = Path(__file__).resolve().parents[2]
CARD = '''title = "Crisp hands"
description = "Face and hand experts for the demo world."
author = "A. Artist"
license = "creativeml-openrail-m"
base_model = "MoLE demo stage 1 (mole_sd15_stage1.safetensors)"
tags = ["hands", "faces"]
usage_hint = "people, close-ups"

[recommended]
mode = "local"
strengths = { face = 0.8, hand = 1.2 }
start_percent = 0.0
end_percent = 0.8
steps = 3
cfg = 5
sampler = "euler"
scheduler = "normal"
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    shapes = dict(list(layer_shapes(SD15, **SD15_DIMS).items())[:12])
    experts = [fake_expert(n, shapes, rank=4, seed=i) for i, n in enumerate(("face", "hand"))]
    gates = fake_gates(experts)
    paths = {"face": folder / "face.safetensors", "hand": folder / "hand.safetensors",
             "gates": folder / "gates.safetensors", "card": folder / "card.toml", "preview": folder / "preview.png"}
    for e in experts:
        expert_file.save(paths[e.name], e)
    gate_file.save(paths["gates"], gates)
    paths["card"].write_text(CARD)
    Image.new("RGB", (640, 480), (200, 120, 40)).save(paths["preview"])
    return paths


def test_card_toml_is_read_strictly(tmp_path, files):
    card = card_format.read_toml(files["card"])
    assert card.title == "Crisp hands" and card.tags == ["hands", "faces"]
    assert card.recommended == card_format.Recommended("local", {"face": 0.8, "hand": 1.2}, 0.0, 0.8, 3, 5.0,
                                                       "euler", "normal")
    bad = tmp_path / "bad.toml"
    for text, message in (('titel = "x"', r"unknown key\(s\) \['titel'\]"), ("title = 3", "title = 3 should be a "
                          "string"), ('tags = "a"', "tags = 'a' should be a list"),
                          ("[recommended]\nmode = 'all'", "mode 'all' is not one of"),
                          ("[recommended]\nsteps = 0", "steps is 0"), ("[recommended]\nstrengths = {face = 9}",
                                                                       "strength of 'face' is 9.0"),
                          ("[recommended]\nstart_percent = 0.9\nend_percent = 0.1", "start_percent 0.9 is after"),
                          ("[recommended]\nseed = 1", "unknown key 'seed'"), ("title = [", "cannot be read as TOML")):
        bad.write_text(text)
        with pytest.raises(FormatError, match=rf"card .*bad.toml: .*{message}"):
            card_format.read_toml(bad)


def test_a_packs_card_is_read_leniently():
    meta = card_format.to_metadata(card_format.Card("T", recommended=card_format.Recommended(steps=9)), "SD1.5")
    back, problems = card_format.from_metadata(meta)
    assert back.title == "T" and back.recommended.steps == 9 and problems == []
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.sai_model_spec"]
    broken = {**meta, "mole.pack_recommended": "{not json", "modelspec.thumbnail": "http://x/y.png"}
    back, problems = card_format.from_metadata(broken)
    assert back.title == "T" and back.recommended is None and back.thumbnail == ""
    assert any("not JSON" in p for p in problems) and any("data:image/" in p for p in problems)
    wrong = {**meta, "mole.pack_recommended": json.dumps({"mode": "sideways", "steps": "many"})}
    back, problems = card_format.from_metadata(wrong)
    assert back.recommended is None and "mode 'sideways'" in problems[0] and "steps is 'many'" in problems[0]
    assert card_format.from_metadata({"mole.pack_version": "1"}) == (None, [])


def test_thumbnails_are_small_or_refused(tmp_path, files):
    made = card_format.thumbnail(files["preview"], made_from_preview=True)
    assert made.startswith("data:image/jpeg;base64,") and len(made) < 40_000
    big = tmp_path / "big.png"
    Image.new("RGB", (1024, 1024)).save(big)
    with pytest.raises(FormatError, match=r"thumbnail .*big.png: 1024x1024 px.*at most 512 px and 256 KiB"):
        card_format.thumbnail(big)
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(small)
    assert card_format.thumbnail(small).startswith("data:image/png;base64,")
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(FormatError, match="picture .*text.png: cannot be read"):
        card_format.thumbnail(tmp_path / "text.png")


def run_pack(files, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "pack", "--experts", f"hand={files['hand']}",
                           f"face={files['face']}", "--gates", str(files["gates"]), "--output", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_pack_command_round_trip_model_card_and_workflow(tmp_path, files):
    out = tmp_path / "crisp_hands.safetensors"
    done = run_pack(files, out, "--card", str(files["card"]), "--preview", str(files["preview"]))
    assert done.returncode == 0, done.stderr[-3000:]
    experts, gates, meta = pack_file.load(out, with_metadata=True)
    originals = [expert_file.load(files[r], r) for r in ("face", "hand")]
    assert [e.name for e in experts] == ["face", "hand"]        # the gates' order, whatever order was given
    for mine, orig in zip(experts, originals):
        assert mine.sha256 == orig.sha256
        assert all(torch.equal(mine.layers[k].down, orig.layers[k].down) for k in orig.layers)
    assert not any(k.startswith("modelspec.") for k in gates.metadata)
    card, problems = pack_file.load_card(meta)
    assert problems == [] and card.title == "Crisp hands" and card.recommended.strengths == {"face": 0.8, "hand": 1.2}
    assert card.thumbnail.startswith("data:image/jpeg;base64,") and meta["modelspec.license"] == "creativeml-openrail-m"
    assert meta["modelspec.tags"] == "hands, faces" and meta["modelspec.date"]

    text = out.with_suffix(".md").read_text()
    front, body = text.split("---\n")[1], text.split("---\n", 2)[2]
    assert 'license: "creativeml-openrail-m"' in front and "pipeline_tag: text-to-image" in front
    assert 'base_model: "MoLE demo stage 1 (mole_sd15_stage1.safetensors)"' in front and '- "hands"' in front
    links = [part.split(")")[0] for part in body.split("](")[1:]]
    assert links and all((tmp_path / link).is_file() for link in links), links      # preview and workflow resolve
    assert f"`{experts[0].sha256}`" in body and "| CFG | 5 |" in body

    flow = json.loads((tmp_path / "crisp_hands_workflow.json").read_text())
    nodes = {n["type"]: n for n in flow["nodes"]}
    assert nodes["MoLE_LoadPack"]["widgets_values"][0] == "crisp_hands.safetensors"
    assert nodes["KSampler"]["widgets_values"][2:6] == [3, 5.0, "euler", "normal"]
    assert nodes["CheckpointLoaderSimple"]["widgets_values"][0] == "mole_sd15_stage1.safetensors"
    apply = nodes["MoLE_Apply"]
    link = next(i["link"] for i in apply["inputs"] if i["name"] == "recommended")
    assert any(l[0] == link and l[1] == nodes["MoLE_LoadPack"]["id"] and l[2] == 2 for l in flow["links"])


def test_pack_command_refuses_what_it_cannot_pack(tmp_path, files):
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 2000)).save(big)
    done = run_pack(files, tmp_path / "x.safetensors", "--thumbnail", str(big))
    assert done.returncode != 0 and "at most 512 px and 256 KiB" in done.stderr
    assert not (tmp_path / "x.safetensors").exists()
    card = tmp_path / "c.toml"
    card.write_text('[recommended]\nstrengths = { feet = 1.0 }\n')
    done = run_pack(files, tmp_path / "y.safetensors", "--card", str(card))
    assert done.returncode != 0 and "strengths name ['feet'], which are not experts of this pack" in done.stderr
    done = subprocess.run([sys.executable, "-m", "trainer", "pack", "--experts", f"face={files['face']}", "--gates",
                           str(files["gates"]), "--output", str(tmp_path / "z")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "give one file per role of the gates" in done.stderr


def test_the_authors_release_as_a_pack(tmp_path, files):
    out = tmp_path / "mole_sdxl.safetensors"
    done = run_pack(files, out, "--preset", "authors-sdxl")
    assert done.returncode == 0, done.stderr[-3000:]
    card, problems = pack_file.load_card(pack_file.load(out, with_metadata=True)[2])
    assert problems == [] and card.title.startswith("MoLE-SDXL") and card.recommended.steps == 50
    rec = card.recommended
    assert (rec.sampler, rec.scheduler, rec.cfg) == ("ddim", "ddim_uniform", 7.5)
    flow = json.loads((tmp_path / "mole_sdxl_workflow.json").read_text())
    ckpt = next(n for n in flow["nodes"] if n["type"] == "CheckpointLoaderSimple")
    assert ckpt["widgets_values"][0] == "sd_xl_base_1.0.safetensors"
