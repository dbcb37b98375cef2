"""The EMoE prompt audit on a 200-line prompt file: scores, quartiles, groups, plots, and resuming."""
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _audit(args):
    done = subprocess.run([sys.executable, "-m", "trainer", "audit", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_audit_of_200_prompts_with_groups_and_resume(detectable, mole_files, tmp_path):
    prompts = tmp_path / "prompts.csv"
    with open(prompts, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "group", "quality"])
        for i in range(200):
            lang = ("en", "fi", "de", "sw")[i % 4]
            w.writerow([f"a photo of person {i} waving, {lang} {i * 7 % 13}", lang, f"{(i * 31) % 17 / 17:.3f}"])
    common = ["--pretrained_model_name_or_path", str(detectable), "--member_loras", str(mole_files["face"]),
              str(mole_files["hand"]), "--resolution", "64", "--output_dir", str(tmp_path / "audit")]
    first50 = tmp_path / "first50.csv"
    first50.write_text("".join(prompts.read_text().splitlines(keepends=True)[:51]))
    _audit(common + ["--prompts", str(first50)])
    log = _audit(common + ["--prompts", str(prompts)])
    assert "resuming: 50 of 200 prompts already scored" in log

    out = tmp_path / "audit"
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and [int(r["index"]) for r in rows] == list(range(200))
    assert all(float(r["score"]) > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "epistemic uncertainty" and summary["prompts"] == 200
    assert set(summary["groups"]) == {"en", "fi", "de", "sw"}
    for g in summary["groups"].values():
        assert g["count"] == 50 and abs(sum(g["quartile_share"].values()) - 1) < 1e-9
        assert -1 <= g["corr_score_quality"] <= 1
    with open(out / "scores_ranked.csv", newline="") as f:
        ranked = list(csv.DictReader(f))
    assert [float(r["score"]) for r in ranked] == sorted((float(r["score"]) for r in rows), reverse=True)
    assert {r["quartile"] for r in ranked} == {"1", "2", "3", "4"}
    for png in ("histogram.png", "groups.png"):
        assert (out / png).stat().st_size > 5000


def test_audit_with_mole_experts_is_labelled_expert_disagreement(detectable, mole_files, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a smiling face\na raised hand\n\na person waving\na blue sky\n")
    _audit(["--pretrained_model_name_or_path", str(detectable), "--experts", f"face={mole_files['face']}",
            f"hand={mole_files['hand']}", "--resolution", "64", "--prompts", str(prompts),
            "--output_dir", str(tmp_path / "a")])
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["kind"] == "expert disagreement" and summary["prompts"] == 4 and summary["mean"] > 0
