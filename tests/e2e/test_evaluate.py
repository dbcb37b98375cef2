"""`python -m trainer evaluate` end to end: the detectable checkpoint through ComfyUI's own sampler (a real server),
a tiny random HPS v2 model of the real layout as scorer, killed half way and resumed."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


from tiny_scorers import write_tiny_hps

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a woman waving her hand", "a man holding a cup", "two girls laughing", "a boy with a kite",
           "a person reading a book", "an old man smiling", "a child drawing", "a lady in a red coat"]


@pytest.fixture(scope="module")
def world(detectable, mole_files, tmp_path_factory):
    """2 models x 6 prompts x 2 repeats: prompts.csv, models.toml and a tiny HPS scorer."""
    folder = tmp_path_factory.mktemp("evaluate")
    with open(folder / "prompts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["repeat", "prompt_id", "seed", "prompt"])
        for repeat in range(2):
            for j in range(6):
                i = (j + 2 * repeat) % len(PROMPTS)
                writer.writerow([repeat, i, 1000 + 6 * repeat + j, PROMPTS[i]])
    (folder / "models.toml").write_text(f"""
reference = "stage 1"
[[model]]
name = "stage 1"
checkpoint = "{detectable}"
[[model]]
name = "MoLE (both gates)"
checkpoint = "{detectable}"
experts = ["{mole_files['face']}", "{mole_files['hand']}"]
gates = "{mole_files['gates']}"
""")
    config, checkpoint = write_tiny_hps(folder / "hps")
    return folder, config, checkpoint


def _cli(world, out: Path, *extra) -> subprocess.Popen:
    folder, config, checkpoint = world
    args = ["evaluate", "--prompts", str(folder / "prompts.csv"), "--models", str(folder / "models.toml"),
            "--output_dir", str(out), "--hps", str(checkpoint), "--hps_arch", str(config), "--width", "64",
            "--height", "64", "--steps", "3", "--device", "cpu", *extra]
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True)


def _servers(out: Path) -> list[int]:
    """PIDs of ComfyUI servers whose base directory is under `out`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_killed_evaluation_resumes_to_the_same_csv(world, tmp_path):
    whole = _cli(world, tmp_path / "whole")
    output = whole.communicate(timeout=600)[0]
    assert whole.returncode == 0, output
    assert "| MoLE (both gates) |" in output and "images: 100%" in output, output
    expected = (tmp_path / "whole" / "scores.csv").read_text()
    assert len(expected.splitlines()) == 1 + 2 * 12

    out = tmp_path / "cut"
    cut = _cli(world, out)
    deadline = time.monotonic() + 600
    while cut.poll() is None and time.monotonic() < deadline and \
            len(list((out / "images").glob("*/*.png"))) < 12:
        time.sleep(0.05)
    os.kill(cut.pid, signal.SIGKILL)            # the client only: its ComfyUI server must not outlive it
    cut.wait()
    made = len(list((out / "images").glob("*/*.png")))
    assert 12 <= made < 24 and not (out / "scores.csv").exists(), made
    deadline = time.monotonic() + 30
    while _servers(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _servers(out), "the killed client's ComfyUI server is still running"
    before = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*/*.png")}

    resumed = _cli(world, out)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert (out / "scores.csv").read_text() == expected
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()), "images made before the kill were redone"

    # scores lost after the kill (a run killed while scoring): only those are scored again, to the same values
    lines = expected.splitlines()
    (out / "scores.csv").write_text("\n".join(lines[:9]) + "\n")
    again = _cli(world, out)
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output
    assert (out / "scores.csv").read_text() == expected
    for name in ("summary.json", "summary.md", "contact_sheet.png", "plots/hps.png"):
        assert (out / name).stat().st_size > 0, name


def test_bad_inputs_fail_early_with_the_file_named(world, tmp_path, mole_files):
    folder, config, checkpoint = world
    empty = tmp_path / "empty.csv"
    empty.write_text("repeat,prompt_id,seed,prompt\n")
    proc = _cli(world, tmp_path / "o1", "--prompts", str(empty))
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and f"--prompts {empty}: no prompt rows" in out, out

    proc = _cli(world, tmp_path / "o2", "--hps", str(tmp_path / "missing_hps.pt"))
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "missing_hps.pt: no such file" in out and "Traceback" not in out, out

    import torch

    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    del state["text_projection"]
    torch.save({"state_dict": state}, tmp_path / "wrong_hps.pt")
    proc = _cli(world, tmp_path / "o4", "--hps", str(tmp_path / "wrong_hps.pt"))
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "wrong_hps.pt: not a ViT-H-14-tiny checkpoint: 1 missing keys" in out, out
    assert not list((tmp_path / "o4").glob("images/*/*.png")), "images were made before the scorer was checked"

    models = tmp_path / "bad_models.toml"
    models.write_text(f'[[model]]\nname = "x"\ncheckpoint = "{tmp_path / "nope.safetensors"}"\n')
    proc = _cli(world, tmp_path / "o3", "--models", str(models))
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "nope.safetensors does not exist" in out, out


def test_a_model_that_fails_to_load_is_reported_and_the_others_are_kept(world, tmp_path, mole_files):
    folder, config, checkpoint = world
    models = tmp_path / "models.toml"
    # a checkpoint that is not one: the expert file in the checkpoint slot
    models.write_text((folder / "models.toml").read_text() + f"""
[[model]]
name = "broken"
checkpoint = "{mole_files['truncated']}"
""")
    proc = _cli(world, tmp_path / "out", "--models", str(models), "--limit", "1")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 1, out
    assert "FAILED" in out and "model 'broken'" in out and "bad_truncated.safetensors" in out, out
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert {r["model"] for r in rows} == {"stage 1", "MoLE (both gates)"} and len(rows) == 4
