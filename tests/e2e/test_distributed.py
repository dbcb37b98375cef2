"""Multi-process training under torchrun (gloo on CPU): a 2-process run of stage 1 and of stage 3 ends where the
1-process run with the same global batch and seed ends, and a killed 2-process run resumes to the same result.

Tolerance: the two runs differ only in the order of floating-point sums (gradients are averaged across processes),
so every trained tensor must agree to within 1% of how far training moved it (as a whole, in L2) and no element
may differ by more than 1e-4; the CSV losses agree to rel 1e-5."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from comfyui_mole.mole_ops import safetensors_io

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def launcher_temp(module_tmp):
    """torchrun leaves a torchelastic_* folder in the temp folder for each launch (more when killed): point the
    launched processes' temp folder into this module's, which is removed with it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(module_tmp("launcher_tmp")))
        yield


def launch(args: list[str], processes: int) -> subprocess.Popen:
    """`python -m trainer ...` (one process) or `torchrun --nproc_per_node=N -m trainer ...`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    prefix = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.Popen([*prefix, "-m", "trainer", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-4000:]
    return output


def losses(folder: Path, name: str) -> list[float]:
    return [float(r.split(",")[1]) for r in (folder / f"{name}_log.csv").read_text().splitlines()[1:]]


def assert_same_training(a: dict, b: dict, start: dict, keys: list[str]) -> None:
    assert keys, "nothing to compare"
    # Adam turns float-order noise in a near-zero gradient into a step of about the learning rate, so single
    # elements can differ by ~1% of their movement after a few steps; the tensor as a whole agrees within 1% (a
    # wrong loss weighting or a missed all-reduce is off by 50% or more) and no element by more than 1e-4.
    for k in keys:
        moved = float((a[k].float() - start[k].float()).norm())
        diff = float((a[k].float() - b[k].float()).norm())
        worst = float((a[k].float() - b[k].float()).abs().max())
        assert diff <= 0.01 * max(moved, 1e-6) and worst <= 1e-4, (k, diff, moved, worst)


@pytest.fixture(scope="module")
def stage1(detectable, train_images, module_tmp):
    """Stage 1 for 4 steps at global batch 4: one process x batch 4, and two processes x batch 2."""
    out = module_tmp("stage1")
    common = ["train-base", "--pretrained_model_name_or_path", str(detectable), "--train_data_dir",
              str(train_images), "--resolution", "64", "--max_train_steps", "4", "--learning_rate", "1e-4",
              "--output_name", "base", "--seed", "3", "--cache_latents", "--min_snr_gamma", "5",
              "--cache_text_encoder_outputs_to_disk"]
    one = finish(launch(common + ["--train_batch_size", "4", "--output_dir", str(out / "one")], 1))
    two = finish(launch(common + ["--train_batch_size", "2", "--output_dir", str(out / "two")], 2))
    return out, one, two, common


def test_stage1_two_processes_equal_one(stage1, detectable, train_images):
    out, one, two, _ = stage1
    assert "1 process(es) x batch 4 x accumulation 1 = global batch 4" in one
    assert "2 process(es) x batch 2 x accumulation 1 = global batch 4" in two
    captions = len({p.read_text().strip() for p in train_images.glob("*.caption")})
    for output in (one, two):     # each caption encoded once, by one of the processes, and shared with the other
        assert f"text encoder outputs cached: {captions} captions, {captions} encoded, 0 reused" in output
    assert len(list((out / "two" / "text_cache").glob("*.safetensors"))) == captions
    assert two.count("wrote ") == 1 and "peak memory" in two and " + " in two.split("peak memory")[1]   # rank 0 logs
    a, _, _ = safetensors_io.read(out / "one" / "base.safetensors")
    b, _, _ = safetensors_io.read(out / "two" / "base.safetensors")
    start, _, _ = safetensors_io.read(detectable)
    assert a.keys() == b.keys()
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert_same_training(a, b, start, unet)
    assert losses(out / "one", "base") == pytest.approx(losses(out / "two", "base"), rel=1e-5)
    assert sorted(p.name for p in (out / "two").iterdir()) == ["base.safetensors", "base_log.csv", "base_loss.png",
                                                               "text_cache"]


def kill_after(process: subprocess.Popen, state: Path, final: Path) -> None:
    """SIGKILL the whole launch (torchrun and its workers) as soon as `state` exists. torchrun starts its workers
    in sessions of their own, so they are killed one by one: a surviving worker waits forever in a collective."""
    import psutil

    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(workers, timeout=30)
    process.wait()
    assert state.exists() and not final.exists(), "not killed between the state and the end"


def test_stage1_two_processes_killed_and_resumed(stage1):
    """The 2-process stage-1 run, killed after its step-2 state and resumed by a new torchrun, ends bitwise where
    the uninterrupted 2-process run ended (the whole UNet and the optimizer state are in the state)."""
    out, _, _, common = stage1
    args = common + ["--train_batch_size", "2", "--output_dir", str(out / "cut"), "--save_every_n_steps", "2",
                     "--save_state"]
    state = out / "cut" / "base-step00000002-state"
    kill_after(launch(args, 2), state, out / "cut" / "base.safetensors")
    resumed = finish(launch(args + ["--resume", str(state)], 2))
    assert "at step 2" in resumed
    a, _, _ = safetensors_io.read(out / "two" / "base.safetensors")
    b, _, _ = safetensors_io.read(out / "cut" / "base.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stage3(detectable, train_images, mole_files, module_tmp):
    out = module_tmp("stage3")
    common = ["train-gates", "--pretrained_model_name_or_path", str(detectable), "--train_data_dir",
              str(train_images), "--resolution", "64", "--max_train_steps", "8", "--learning_rate", "1e-3",
              "--experts", f"face={mole_files['face']}", f"hand={mole_files['hand']}", "--output_name", "g",
              "--seed", "5", "--save_every_n_steps", "2", "--save_state", "--lr_scheduler", "cosine"]
    return out, common


def test_stage3_two_processes_equal_one_and_resume_after_kill(stage3):
    out, common = stage3
    one = launch(common + ["--train_batch_size", "4", "--output_dir", str(out / "one")], 1)
    finish(one)
    two = launch(common + ["--train_batch_size", "2", "--output_dir", str(out / "two")], 2)
    finish(two)
    a, _, _ = safetensors_io.read(out / "one" / "g.safetensors")
    b, _, _ = safetensors_io.read(out / "two" / "g.safetensors")
    start, _, _ = safetensors_io.read(out / "two" / "g-step00000002.safetensors")   # how far steps 3-8 moved
    assert a.keys() == b.keys()
    assert_same_training(a, b, start, sorted(a))
    assert losses(out / "one", "g") == pytest.approx(losses(out / "two", "g"), rel=1e-5)

    # the same 2-process run, killed after its step-2 state, resumed by a new torchrun
    cut = launch(common + ["--train_batch_size", "2", "--output_dir", str(out / "cut")], 2)
    state = out / "cut" / "g-step00000002-state"
    kill_after(cut, state, out / "cut" / "g.safetensors")
    resumed = finish(launch(common + ["--train_batch_size", "2", "--output_dir", str(out / "cut"),
                                      "--resume", str(state)], 2))
    assert "resumed from" in resumed and "at step 2" in resumed
    c, _, _ = safetensors_io.read(out / "cut" / "g.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b), "the resumed 2-process run differs from the uninterrupted one"
    assert losses(out / "cut", "g") == losses(out / "two", "g")


def test_stage2_two_processes_equal_one(detectable, train_images, tmp_path):
    """Stage 2 as well, with gradient accumulation (2 micro-batches, gradients synchronised on the last)."""
    common = ["train-expert", "--pretrained_model_name_or_path", str(detectable), "--train_data_dir",
              str(train_images), "--resolution", "64", "--max_train_steps", "3", "--learning_rate", "1e-3",
              "--network_dim", "4", "--output_name", "e", "--seed", "9", "--gradient_accumulation_steps", "2"]
    finish(launch(common + ["--train_batch_size", "2", "--output_dir", str(tmp_path / "one")], 1))
    finish(launch(common + ["--train_batch_size", "1", "--output_dir", str(tmp_path / "two")], 2))
    a, _, _ = safetensors_io.read(tmp_path / "one" / "e.safetensors")
    b, _, _ = safetensors_io.read(tmp_path / "two" / "e.safetensors")
    start = {k: torch.zeros_like(v) if "lora_up" in k else v for k, v in a.items()}   # up starts at zero
    ups = [k for k in a if "lora_up" in k]
    assert_same_training(a, b, start, ups)
    assert all(torch.equal(a[k], b[k]) or float((a[k] - b[k]).abs().max()) <= 1e-5 for k in a)
    assert losses(tmp_path / "one", "e") == pytest.approx(losses(tmp_path / "two", "e"), rel=1e-5)
