"""A shortened demo (`python -m trainer demo --quick`): the whole pipeline runs, leaves the report, the images and
the gate maps, and a second run reuses every trained file."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _demo(out: Path) -> tuple[str, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "trainer", "demo", "--quick", "--output_dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr, time.monotonic() - start


def test_quick_demo_end_to_end(tmp_path, comfy):
    out = tmp_path / "demo"
    first, _ = _demo(out)
    results = out / "results"
    report = (results / "report.md").read_text()
    for heading in ("Local gates on held-out scenes", "Global gates on held-out close-ups",
                    "Held-out denoising loss", "The shipped workflows"):
        assert heading in report
    assert "synthetic world" in report
    found = json.loads((results / "evidence.json").read_text())
    assert set(found["local"]) == {"t=800", "t=500", "t=200", "mean"}
    assert set(found["loss"]) >= {"tiny base", "+ stage 1", "+ experts, fixed scale (no gates)",
                                  "+ gates, both (MoLE)", "+ gates, local only", "+ gates, global only"}
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
    assert {p: p.stat().st_mtime_ns for p in models.rglob("*.safetensors")} == stamps
    assert "training the VAE" not in second
    assert not any(f"train-{stage}:" in second for stage in ("finetune", "expert", "gates"))
