"""A shortened demo (`python -m trainer demo --quick`): the whole pipeline runs, leaves the report, the images and
the gate maps, and a second run reuses every trained file; `python -m trainer serve` opens its files in a real
ComfyUI where the shipped txt2img workflow runs at demo size."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _demo(out: Path) -> tuple[str, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "trainer", "demo", "--quick", "--output_dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr, time.monotonic() - start


@pytest.fixture(scope="module")
def quick_demo(comfy, module_tmp) -> Path:
    """The quick demo's folder after a first run."""
    out = module_tmp("quick_demo") / "demo"
    _demo(out)
    return out


def test_quick_demo_end_to_end(quick_demo):
    out = quick_demo
    results = out / "results"
    report = (results / "report.md").read_text()
    for heading in ("The goals at a glance", "Local gates on held-out scenes", "Global gates on held-out close-ups",
                    "Held-out denoising loss", "The shipped workflows", "Before the gates: does each expert help"):
        assert heading in report
    effect = json.loads((results / "expert_effect.json").read_text())
    assert set(effect["delta"]) == {"face", "hand"} and effect["regions"] == ["face", "hand", "background"]
    assert set(effect["verdicts"]) == {"face", "hand"} and (results / "expert_effect.png").stat().st_size > 1000
    assert "synthetic world" in report
    found = json.loads((results / "evidence.json").read_text())
    assert set(found["local"]) == {"t=800", "t=500", "t=200", "mean"}
    assert 5 < found["vae_psnr"]["mean"] < 60 and "dB PSNR" in report
    assert set(found["loss"]) == {"base", "+ stage 1", "+ experts, fixed scale 0.25", "+ experts, fixed scale 0.5",
                                  "+ experts, fixed scale 1 (no gates)", "+ untrained gates (both)",
                                  "+ gates, both (MoLE)", "+ gates, local only", "+ gates, global only",
                                  "+ gates, both (MoLE), experts at 99% energy"}
    summary = json.loads((results / "evaluation" / "summary.json").read_text())
    assert summary["scorers"] == ["loss", "loss_face", "loss_hand", "loss_background"]
    assert summary["models"]["+ stage 1"]["loss"]["vs_reference"]["mean"] == 0.0
    assert "| + gates, both (MoLE) | " in report and "Tables 2-3" in report
    # the generation table: the judge as evaluate's scorer, through the real server, on every model's pictures
    generation = json.loads((results / "generation" / "summary.json").read_text())
    assert generation["scorers"] == ["all_found", "person_found", "face_found", "hand_found", "face_detail",
                                     "hand_detail"]
    # every model of the held-out table but the reduced-rank one (held-out only: it would cost 24 more pictures)
    assert set(generation["models"]) == set(found["loss"]) - {"+ gates, both (MoLE), experts at 99% energy"}
    assert generation["reference"] == "+ stage 1"
    assert "MoLE with its experts at 99% energy" in report
    assert all(by["person_found"]["images"] == 2 for by in generation["models"].values())
    assert "Generated pictures, judged" in report and "stage-1 samples with a person, a face and a hand" in report
    assert (results / "generation" / "contact_sheet.png").stat().st_size > 1000
    assert "mask IoU person" in report
    # the gates while generating: the shipped txt2img graph's saved traces, per kind of generated picture
    gating = json.loads((results / "generated_gates.json").read_text())
    assert gating["pictures"] == {"face close-ups": 5, "hand close-ups": 5, "scenes": 5}
    assert all(len(curve) == 3 and len(curve[0]) == 2 for curve in gating["global"].values())   # steps x experts
    assert "The gates while generating" in report and (results / "generated_gates.png").stat().st_size > 1000
    for name in ("heldout_gate_overlay.png", "mole_sd15_gate_grid_00001_.png", "mole_sd15_gate_overlay_00001_.png",
                 "mole_sd15_gate_curves_00001_.png", "mole_sd15_ablation_00001_.png", "mole_sd15_stage1_loss.png",
                 "mole_sd15_face_loss.png", "mole_sd15_gates_loss.png"):
        assert (results / name).stat().st_size > 500, name
    models = out / "models"
    assert {p.name for p in (models / "mole").glob("*.safetensors")} == {
        "mole_sd15_face.safetensors", "mole_sd15_hand.safetensors", "mole_sd15_gates.safetensors"}

    stamps = {p: p.stat().st_mtime_ns for p in models.rglob("*.safetensors")}
    second, seconds = _demo(out)
    assert second.count("reusing") == 4                       # stage 1, two experts, gates
    assert "phase generation table:" in second and "images:" not in second   # nothing generated again
    assert "phase gates while generating:" in second
    assert {p: p.stat().st_mtime_ns for p in models.rglob("*.safetensors")} == stamps
    assert "training the VAE" not in second
    assert not any(f"train-{stage}:" in second for stage in ("finetune", "expert", "gates"))


def test_serve_opens_the_demo_files_and_stops_cleanly(quick_demo):
    """`serve` on the demo's folder (its files exist: nothing is trained) starts ComfyUI on them with the
    demo-sized workflows and stops on Ctrl-C; the shipped txt2img workflow runs there in under a minute."""
    import signal
    import urllib.request

    from comfyui_mole.trainer.harness.comfy_server import ComfyServer, free_port
    from comfyui_mole.trainer.harness.workflows import load_api

    out, port = quick_demo, free_port()
    serving = subprocess.Popen([sys.executable, "-m", "trainer", "serve", "--quick", "--output_dir", str(out),
                                "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines = []
        for line in serving.stdout:
            lines.append(line)
            if line.startswith("ComfyUI with the MoLE demo:"):
                break
        assert f"http://127.0.0.1:{port}" in lines[-1], "".join(lines[-40:])
        saved = sorted(p.name for p in (out / "comfy" / "user" / "default" / "workflows").iterdir())
        assert saved == ["MoLE demo EMoE uncertainty.json", "MoLE demo ablation grid.json",
                         "MoLE demo txt2img with gates.json"]
        client = ComfyServer(out / "comfy", port=port)          # drives the running server, starts nothing
        start = time.monotonic()
        outputs = client.run(load_api("mole_sd15_txt2img", 64, 64, 3), timeout=60)
        assert time.monotonic() - start < 60
        assert len(client.output_files(outputs)) == 4           # the image, gate grid, overlay and curves
    finally:
        serving.send_signal(signal.SIGINT)
        try:
            rest = serving.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            serving.kill()
            pytest.fail("serve did not stop within 60 s of Ctrl-C:\n" + serving.communicate()[0][-3000:])
    assert serving.returncode == 0, rest[-3000:]
    assert "stopping ComfyUI" in rest
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=5)


def test_the_in_world_evaluation_is_the_evaluate_command(quick_demo, tmp_path):
    """`evaluate --heldout` with the demo's models.toml on its held-out scenes gives the demo's own table, number for
    number; a second call only summarises (every model's rows are kept)."""
    results = quick_demo / "results" / "evaluation"
    scenes = quick_demo / "world" / "heldout" / "scenes"
    args = ["evaluate", "--models", str(results / "models.toml"), "--heldout", str(scenes), "--masks",
            str(scenes / "masks"), "--seeds", "0", "--output_dir", str(tmp_path / "eval"), "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mine = (tmp_path / "eval" / "scores.csv").read_text().splitlines()
    demo = (results / "scores.csv").read_text().splitlines()
    assert [line.split(",")[-4:] for line in mine] == [line.split(",")[-4:] for line in demo]
    assert "## held-out denoising loss, hand cells (lower is better)" in done.stdout
    again = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "10/10" in again.stderr and "loading" not in again.stderr.lower()
    wrong = subprocess.run([sys.executable, "-m", "trainer", *args[:-4], "--seeds", "0", "1", "--output_dir",
                            str(tmp_path / "eval")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert wrong.returncode != 0 and "holds an evaluation of other models, pictures or seeds" in wrong.stderr


def test_the_demo_shares_its_mole_as_a_pack_with_every_card_field(quick_demo):
    """`python -m trainer pack` on the demo's files (demo/share): the card's every field is in the pack, the model
    card's links (preview, workflow) resolve, and the workflow loads this pack."""
    from comfyui_mole.mole_ops import pack_file

    share = quick_demo / "share"
    experts, gates, meta = pack_file.load(share / "mole_sd15_demo.safetensors", with_metadata=True)
    assert [e.name for e in experts] == ["face", "hand"] and gates.experts == ("face", "hand")
    for key in ("sai_model_spec", "architecture", "implementation", "title", "description", "author", "license",
                "date", "tags", "usage_hint", "thumbnail"):
        assert meta.get(f"modelspec.{key}"), key
    card, problems = pack_file.load_card(meta)
    assert problems == [] and card.title == "MoLE demo world" and card.base_model.startswith("the demo's stage-1")
    assert card.thumbnail.startswith("data:image/jpeg;base64,") and card.recommended.steps == 3
    text = (share / "mole_sd15_demo.md").read_text()
    links = [part.split(")")[0] for part in text.split("](")[1:]]
    assert sorted(links) == ["mole_sd15_demo.png", "mole_sd15_demo_workflow.json"]
    assert all((share / link).is_file() for link in links)
    flow = json.loads((share / "mole_sd15_demo_workflow.json").read_text())
    assert any(n["type"] == "MoLE_LoadPack" and n["widgets_values"] == ["mole_sd15_demo.safetensors", "full"]
               for n in flow["nodes"])
