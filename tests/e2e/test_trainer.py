"""The trainer on the detectable checkpoint and a small generated image set: stage 2 and stage 3 learn, touch only
what they train, resume bitwise, and write files that ComfyUI's stock LoRA loader and our nodes load."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from comfyui_mole.mole_ops import expert_file, gate_file, safetensors_io
from comfyui_mole.mole_ops.hooks import attach
from comfyui_mole.trainer.training.config import TrainConfig, validate
from comfyui_mole.trainer.harness.host import comfyui_path
from trainer_utils import held_out, make_config, run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def experts(comfy, detectable, train_images, module_tmp):
    """Two experts trained for a few steps (stage 2), and the held-out losses of the face run."""
    out = module_tmp("experts")
    losses = {}
    for name, steps in (("face", 30), ("hand", 10)):
        r = run(make_config(detectable, train_images, out, "expert", output_name=name, expert_name=name,
                            network_dim=4, network_alpha=4.0, max_train_steps=steps, seed=len(name)))
        r.precache()
        before = held_out(r)
        r.train()
        losses[name] = (before, held_out(r))
        r.stage.detach()
    return {"face": out / "face.safetensors", "hand": out / "hand.safetensors", "losses": losses, "dir": out}


def test_stage2_learns_and_writes_a_kohya_lora(experts):
    before, after = experts["losses"]["face"]
    assert after < 0.97 * before, (before, after)
    e = expert_file.load(experts["face"], "face")
    assert e.metadata["ss_network_dim"] == "4" and e.metadata["ss_network_alpha"] == "4.0"
    assert e.metadata["ss_base_model_version"] == "sd_v1" and e.metadata["ss_steps"] == "30"
    assert e.metadata["mole.base_model"].startswith("unet-sha256:") and e.sha256 == e.metadata["sshs_model_hash"]
    assert all(k.startswith("lora_unet_down_blocks_0_attentions_0") or k.startswith("lora_unet_up_blocks_0")
               for k in e.layers)                          # SD1.5: kohya's diffusers names
    assert any(float(w.up.abs().max()) > 0 for w in e.layers.values())
    rows = (experts["dir"] / "face_log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,seconds" and len(rows) == 31
    assert (experts["dir"] / "face_loss.png").stat().st_size > 1000


def test_stage2_file_loads_in_stock_lora_loader_and_our_nodes(experts, detectable, caplog):
    import comfy.sd
    import comfy.utils

    from comfyui_mole.mole_ops.mixture import build
    from comfyui_mole.trainer.training.model import Base

    base = Base(detectable)
    lora = comfy.utils.load_torch_file(str(experts["face"]), safe_load=True)
    with caplog.at_level(logging.WARNING):
        model, clip = comfy.sd.load_lora_for_models(base.patcher, base.clip, lora, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "ERROR" not in caplog.text
    assert len(model.patches) == len(base.layout.layer_keys)
    mole = build([expert_file.load(experts["face"], "face")], None, base.layout)
    assert sorted(mole.keys) == sorted(base.layout.layer_keys)


@pytest.fixture(scope="module")
def gates(experts, detectable, train_images, module_tmp):
    out = module_tmp("gates")
    config = make_config(detectable, train_images, out, "gates", max_train_steps=30, learning_rate=1e-2,
                         experts=[f"face={experts['face']}", f"hand={experts['hand']}"], save_pack=True,
                         output_name="gates")
    r = run(config)
    r.precache()
    unet_before = {k: v.clone() for k, v in r.base.unet.state_dict().items()}
    experts_before = {n: p.clone() for n, p in r.stage.mole.named_parameters() if ".experts." in n}
    gates_before = {n: p.detach().clone() for n, p in r.stage.named_trainable().items()}
    before = held_out(r)
    r.train()
    return types.SimpleNamespace(run=r, out=out, before=before, after=held_out(r), unet=unet_before,
                                 experts=experts_before, gates=gates_before)


def test_stage3_trains_only_the_gates_and_learns(gates):
    r = gates.run
    assert gates.after < gates.before, (gates.before, gates.after)
    for k, v in r.base.unet.state_dict().items():
        assert torch.equal(v, gates.unet[k]), f"base weight {k} changed"
    for n, p in r.stage.mole.named_parameters():
        if ".experts." in n:
            assert torch.equal(p, gates.experts[n]), f"expert weight {n} changed"
    changed = [n for n, p in r.stage.named_trainable().items() if not torch.equal(p, gates.gates[n])]
    assert len(changed) == len(gates.gates) > 0
    saved = gate_file.load(gates.out / "gates.safetensors")
    assert saved.experts == ("face", "hand") and saved.variant == "official"
    assert saved.base_model == r.base.fingerprint and saved.expert_info["face"]["rank"] == 4
    assert (gates.out / "gates_pack.safetensors").exists()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_trains_the_gates_as_eager_does(experts, detectable, train_images, tmp_path, backend):
    """kohya's --torch_compile: the UNet with MoLE's hooks traced into the graph trains the same gates as eager
    PyTorch does (each step's loss and the saved gates, to float error), and the base stays untouched. aot_eager
    checks the capture and autograd through the hooks in seconds; inductor (its C++ kernels) takes a minute or two
    to compile on 2 cores, so it runs with --runslow."""
    saved = {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        r = run(make_config(detectable, train_images, out, "gates", max_train_steps=3, learning_rate=1e-2,
                            experts=[f"face={experts['face']}", f"hand={experts['hand']}"], output_name="gates",
                            torch_compile=compiled, dynamo_backend=backend))
        r.train()
        r.stage.detach()
        saved[compiled] = ([float(row.split(",")[1]) for row in (out / "gates_log.csv").read_text().splitlines()[1:]],
                           gate_file.load(out / "gates.safetensors"))
        assert (r.base._compiled is not None) == compiled
    (eager_losses, eager), (compiled_losses, compiled) = saved[False], saved[True]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4) and len(eager_losses) == 3
    a, b = eager.tensors(), compiled.tensors()
    assert a.keys() == b.keys()
    for k in a:      # 3 AdamW steps of lr 1e-2 move a weight by up to 3e-2; fused kernels round differently
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=3e-4, msg=k)    # (inductor: 9e-5 at most here)


def test_stage3_file_in_apply_mole_samples_what_the_trainer_samples(gates, experts):
    """The gate file loaded the way Apply MoLE loads it gives the same image as the trainer's own model."""
    from comfyui_mole.mole_ops.mixture import build
    from comfyui_mole.nodes.patch import MoLEPatch, apply_mole
    from comfyui_mole.trainer.training.samples import SamplePrompt, generate

    r = gates.run
    item = SamplePrompt("a red circle on a blue background", "blurry", 64, 64, seed=3, cfg=5.0, steps=4)
    trainer_image = generate(r.base, item)
    r.stage.detach()
    try:
        loaded = [expert_file.load(experts["face"], "face"), expert_file.load(experts["hand"], "hand")]
        mole = build(loaded, gate_file.load(gates.out / "gates.safetensors"), r.base.layout)
        patched = apply_mole(r.base.patcher, MoLEPatch(mole))
        node_image = generate(types.SimpleNamespace(patcher=patched, clip=r.base.clip, vae=r.base.vae,
                                                    family=r.base.family), item)
        base_image = generate(r.base, item)
    finally:
        r.stage.handles = attach(r.base.model, r.stage.mole, r.stage.state)
    assert (trainer_image - base_image).abs().max() > 1e-3
    # same math, other float order: while gates train, their logits are a matmul of their own and the official
    # global gate comes from the pooled hidden blocks (a frozen model folds both into the experts' matmul)
    torch.testing.assert_close(node_image, trainer_image, rtol=0, atol=1e-4)


def _cli(args, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def test_killed_run_resumed_ends_bitwise_equal(detectable, train_images, tmp_path):
    common = ["train-expert", "--pretrained_model_name_or_path", str(detectable), "--train_data_dir",
              str(train_images), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "12",
              "--learning_rate", "1e-3", "--network_dim", "4", "--save_every_n_steps", "3", "--save_state",
              "--output_name", "e", "--seed", "7", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]
    whole = _cli(common + ["--output_dir", str(tmp_path / "whole")])
    assert whole.wait(timeout=300) == 0, whole.stdout.read()

    cut = _cli(common + ["--output_dir", str(tmp_path / "cut")])
    state = tmp_path / "cut" / "e-step00000006-state"
    deadline = time.monotonic() + 300
    while not state.exists() and cut.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.wait()
    assert not (tmp_path / "cut" / "e.safetensors").exists(), "the run finished before it was killed"
    resumed = _cli(common + ["--output_dir", str(tmp_path / "cut"), "--resume", str(state)])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output and "at step 6" in output

    a, _, _ = safetensors_io.read(tmp_path / "whole" / "e.safetensors")
    b, _, _ = safetensors_io.read(tmp_path / "cut" / "e.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole_log = (tmp_path / "whole" / "e_log.csv").read_text().splitlines()
    cut_log = (tmp_path / "cut" / "e_log.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in whole_log] == [r.split(",")[:3] for r in cut_log]


# Runs the trainer's CLI with os.replace made fatal for a state file: the process dies after the new state was
# written and fsynced, just before it would replace the old one.
_DIE_BEFORE_STATE_RENAME = """
import os, runpy, signal, sys
rename = os.replace
def replace(src, dst):
    if str(dst).endswith("state.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst)
os.replace = replace
sys.argv = ["trainer", *sys.argv[1:]]
runpy.run_module("trainer", run_name="__main__", alter_sys=True)
"""


def test_a_run_killed_while_saving_its_state_keeps_the_previous_one(detectable, train_images, tmp_path):
    out = tmp_path / "out"
    common = ["train-expert", "--pretrained_model_name_or_path", str(detectable), "--train_data_dir",
              str(train_images), "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
              "--network_dim", "4", "--save_every_n_steps", "2", "--save_state", "--output_name", "e", "--seed", "3",
              "--output_dir", str(out)]
    first = _cli(common + ["--max_train_steps", "4"])
    assert first.wait(timeout=300) == 0, first.stdout.read()
    final = out / "e-state"
    old = (final / "state.pt").read_bytes()

    # again from step 2: the final save meets e-state, and the process dies before the new file replaces the old
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    dying = subprocess.run([sys.executable, "-c", _DIE_BEFORE_STATE_RENAME, *common, "--max_train_steps", "4",
                            "--resume", str(out / "e-step00000002-state")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert dying.returncode == -signal.SIGKILL, dying.stdout[-2000:] + dying.stderr[-2000:]
    assert (out / "e-state.tmp" / "state.pt").stat().st_size > 0          # the new state was written in full
    assert (final / "state.pt").read_bytes() == old                         # the old one is untouched

    resumed = _cli(common + ["--max_train_steps", "6", "--resume", str(final)])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "at step 4" in output and not (out / "e-state.tmp").exists()
    assert torch.load(final / "state.pt", weights_only=True)["progress"]["step"] == 6


def test_cli_reports_host_and_server_errors_in_one_line(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path / "nowhere"))
    done = subprocess.run([sys.executable, "-m", "trainer", "workflows", "--output_dir", str(tmp_path / "wf")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: no ComfyUI at {tmp_path / 'nowhere'}: run `make host` "
                                                "(or set COMFYUI_PATH to a ComfyUI folder)"]


def test_kohya_options_run_together(detectable, train_images, tmp_path):
    """Lion, a linear schedule with warm-up, Min-SNR, clip skip, bf16 autocast, accumulation, a dataset TOML
    with metadata and flips, latents cached on disk, and sample images, in one short run."""
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({p.stem: {"caption": p.with_suffix(".caption").read_text()}
                                              for p in sorted(train_images.glob("*.png"))}))
    toml = tmp_path / "data.toml"
    toml.write_text(f'[general]\nflip_aug = true\nshuffle_caption = true\nkeep_tokens = 1\n\n[[datasets]]\n'
                    f'resolution = 64\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = "{train_images}"\n'
                    f'  metadata_file = "{meta}"\n  num_repeats = 2\n')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --n blurry --w 64 --h 64 --d 5 --l 4 --s 3\n")
    c = TrainConfig(stage="expert", pretrained_model_name_or_path=str(detectable), dataset_config=str(toml),
                    output_dir=str(tmp_path / "out"), output_name="opts", optimizer_type="Lion",
                    learning_rate=1e-4, lr_scheduler="linear", lr_warmup_steps=1, min_snr_gamma=5.0, clip_skip=2,
                    mixed_precision="bf16", gradient_accumulation_steps=2, max_train_steps=4,
                    cache_latents_to_disk=True, sample_prompts=str(prompts), sample_every_n_steps=2)
    validate(c)
    r = run(c)
    r.train()
    r.stage.detach()
    assert sorted(p.name for p in (tmp_path / "out" / "sample").iterdir()) == ["opts_000002_00.png",
                                                                                "opts_000004_00.png"]
    assert len(list((tmp_path / "out" / "latent_cache").glob("*.safetensors"))) == 16   # 8 images, flipped too
    lrs = [float(row.split(",")[2]) for row in (tmp_path / "out" / "opts_log.csv").read_text().splitlines()[1:]]
    assert lrs[0] > lrs[-1] == 0.0                                                    # linear decay to 0
    assert expert_file.load(tmp_path / "out" / "opts.safetensors", "x").metadata["ss_steps"] == "4"


def test_console_script_is_installed_and_fails_clearly(tmp_path, detectable, train_images):
    """`pip install .` gives the `mole-train` console script; a contradiction fails before any work."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(ROOT)], check=True, capture_output=True)
    script = target / "bin" / "mole-train"
    env = dict(os.environ, PYTHONPATH=str(target), COMFYUI_PATH=str(comfyui_path()))
    shown = subprocess.run([str(script), "train-expert", "--help"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "usage: mole-train train-expert" in shown.stdout
    assert "--network_dim" in shown.stdout and "--pretrained_model_name_or_path" in shown.stdout
    bad = subprocess.run([str(script), "train-expert", "--pretrained_model_name_or_path", str(detectable),
                          "--train_data_dir", str(train_images), "--output_dir", str(tmp_path / "o"),
                          "--output_name", "x", "--mixed_precision", "fp16"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "error: --mixed_precision fp16 needs a GPU" in bad.stderr
    assert not (tmp_path / "o").exists()


def test_training_with_buckets_of_several_sizes(detectable, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(64, 64), (64, 64), (128, 64), (128, 64), (64, 128), (64, 128)]):
        Image.new("RGB", (w, h), (40 * i, 120, 60)).save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text(f"a picture number {i}")
    c = TrainConfig(stage="expert", pretrained_model_name_or_path=str(detectable), train_data_dir=str(folder),
                    resolution="64", train_batch_size=2, output_dir=str(tmp_path / "out"), output_name="b",
                    max_train_steps=6, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                    bucket_reso_steps=32, cache_latents=True)
    validate(c)
    r = run(c)
    r.train()
    r.stage.detach()
    assert len({s for s in r.plan.datasets[0].sizes}) == 3          # square, wide and tall buckets
    assert len(r.cache.memory) == 6 and len({t.shape for t in r.cache.memory.values()}) == 3
    assert expert_file.load(tmp_path / "out" / "b.safetensors", "b").metadata["ss_steps"] == "6"


def test_masked_loss_through_the_trainer(detectable, train_images, tmp_path, caplog):
    """--masked_loss with a conditioning folder: white masks give exactly the plain loss, half-black masks another
    one, and a masked run trains and writes its expert."""
    from PIL import Image

    def masks(name, box):
        folder = tmp_path / name
        folder.mkdir()
        for image in sorted(train_images.glob("*.png")):
            mask = Image.new("L", (64, 64), 0)
            mask.paste(255, box)
            mask.save(folder / image.name)
        return folder

    white, right = masks("white", (0, 0, 64, 64)), masks("right", (32, 0, 64, 64))

    def first_loss(**kw):
        r = run(make_config(detectable, train_images, tmp_path / "out", "expert", max_train_steps=2, **kw))
        try:
            with torch.no_grad():
                return float(r.loss(r.next_batch(), torch.Generator().manual_seed(5))), r
        finally:
            r.stage.detach()

    plain, _ = first_loss()
    with caplog.at_level(logging.INFO):
        ones, _ = first_loss(masked_loss=True, conditioning_data_dir=str(white))
    assert "masked loss: 8 image(s) with a mask, 0 without" in caplog.text
    half, r = first_loss(masked_loss=True, conditioning_data_dir=str(right))
    assert ones == plain and half < 0.75 * plain
    r = run(make_config(detectable, train_images, tmp_path / "trained", "expert", max_train_steps=3,
                        masked_loss=True, conditioning_data_dir=str(right), output_name="masked"))
    r.train()
    r.stage.detach()
    assert expert_file.load(tmp_path / "trained" / "masked.safetensors", "face").metadata["ss_steps"] == "3"


def test_text_encoder_outputs_cached_per_caption_and_on_disk(detectable, train_images, tmp_path, caplog):
    """A frozen text encoder's cached outputs are bitwise what it computes, keyed by its weights and clip skip
    (another Base of the same file shares them); a training text encoder is never cached;
    --cache_text_encoder_outputs_to_disk encodes every caption up front into output_dir/text_cache, and a later
    run reads them back instead of encoding; shuffle_caption with it is refused before the model loads."""
    from comfyui_mole.trainer.training.config import ConfigError
    from comfyui_mole.trainer.training.model import TEXT_CACHE, Base

    captions = sorted({p.read_text().strip() for p in train_images.glob("*.caption")})
    base = Base(detectable)
    fresh = torch.cat([base.encode_caption(c)[0] for c in captions])
    assert torch.equal(base.encode_text(captions, (64, 64)).context, fresh)
    hits = TEXT_CACHE.hits
    assert torch.equal(Base(detectable).encode_text(captions, (64, 64)).context, fresh)
    assert TEXT_CACHE.hits == hits + len(captions)
    assert Base(detectable, clip_skip=2).text_encoder_id != base.text_encoder_id
    training = Base(detectable)
    training.make_text_encoder_trainable()
    before = (TEXT_CACHE.hits, TEXT_CACHE.misses)
    training.encode_text(captions[:1], (64, 64))
    assert (TEXT_CACHE.hits, TEXT_CACHE.misses) == before

    def train(out):
        r = run(make_config(detectable, train_images, out, "expert", max_train_steps=1,
                            cache_text_encoder_outputs_to_disk=True))
        r.train()
        r.stage.detach()

    train(tmp_path / "a")
    assert len(list((tmp_path / "a" / "text_cache").glob("*.safetensors"))) == len(captions)
    TEXT_CACHE.memory.clear()
    TEXT_CACHE.bytes = 0
    with caplog.at_level(logging.INFO):
        train(tmp_path / "a")
    assert f"text encoder outputs cached: {len(captions)} captions, 0 encoded, {len(captions)} reused" in caplog.text
    toml = tmp_path / "shuffled.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{train_images}"\n'
                    '  shuffle_caption = true\n')
    c = TrainConfig(stage="expert", pretrained_model_name_or_path=str(detectable), dataset_config=str(toml),
                    output_dir=str(tmp_path / "s"), output_name="s", cache_text_encoder_outputs=True)
    validate(c)
    with pytest.raises(ConfigError, match="shuffle_caption .* makes a new caption every step"):
        run(c)


def test_expert_effect_command_on_real_files(detectable, train_images, mole_files, tmp_path):
    """`python -m trainer expert-effect` on the detectable checkpoint with generated experts and region masks:
    a table per region, verdicts, the cross-effect (on the other part's cells, and on close-ups as whole pictures),
    JSON and a plot; a bad expert or close-up argument is one clear line."""
    from PIL import Image

    masks = tmp_path / "masks"
    masks.mkdir()
    for image in sorted(train_images.glob("*.png")):
        for region, box in (("face", (0, 0, 32, 32)), ("hand", (32, 32, 64, 64))):
            mask = Image.new("L", (64, 64), 0)
            mask.paste(255, box)
            mask.save(masks / f"{image.stem}_{region}.png")
    args = ["expert-effect", "--pretrained_model_name_or_path", str(detectable), "--images", str(train_images),
            "--masks", str(masks), "--timesteps", "500", "200", "--output_dir", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-m", "trainer", *args, "--experts", f"face={mole_files['face']}",
                           f"hand={mole_files['hand']}", "--closeups", f"face={train_images}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "face (128 cells)" in done.stdout and "- face: " in done.stdout and "- hand: " in done.stdout
    assert "- hand expert on face: " in done.stdout and "- face expert on hand: " in done.stdout
    assert "- hand expert on face close-ups (whole pictures): " in done.stdout
    closeups = json.loads((tmp_path / "out" / "expert_effect_closeups.json").read_text())
    assert closeups["face"]["cells"]["picture"] == 8 * 64 and "On close-ups as whole pictures" in (
        tmp_path / "out" / "expert_effect.md").read_text()
    result = json.loads((tmp_path / "out" / "expert_effect.json").read_text())
    assert result["cells"] == {"face": 8 * 16, "hand": 8 * 16, "background": 8 * 32}
    assert set(result["delta"]["face"]) == {"500", "200", "mean"} and (tmp_path / "out" / "expert_effect.png").exists()
    bad = subprocess.run([sys.executable, "-m", "trainer", *args, "--experts", "face"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --experts 'face': give role=path to an existing file"]
    bad = subprocess.run([sys.executable, "-m", "trainer", *args, "--experts", f"face={mole_files['face']}",
                          "--closeups", "faces"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --closeups 'faces': give kind=folder, e.g. face=closeups/faces (an existing folder of images with "
        "caption files)"]
