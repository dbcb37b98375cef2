"""The authors' own released command lines (SPEC.md section 5; their repository's shell scripts), pasted with only
the script name replaced by our subcommand, at test sizes (two steps, 64 px, our paths added): all four run, and
what they write loads in our loaders and, for the experts, in ComfyUI's stock LoRA loader. Then the kohya flags
implemented under their own names change what they should (noise offset, training comment)."""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_mole.mole_ops import expert_file, gate_file, safetensors_io

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"fine_tune.py": "train-base", "train_network.py": "train-expert", "train_moe.py": "train-gates"}
AUTHORS = {
    "stage 1": "fine_tune.py --learning_rate=2e-6 --max_train_steps=300000 --use_lion_optimizer --min_snr_gamma=5 "
               "--mixed_precision=bf16 --gradient_accumulation_steps=4 --clip_skip=1 --save_state "
               "--save_every_n_steps=1000 --sample_every_n_steps=500 --xformers --diffusers_xformers",
    "face": "train_network.py --network_module=networks.lora --network_train_unet_only --optimizer_type=AdamW "
            "--mixed_precision=bf16 --gradient_accumulation_steps=4 --network_dim=256 --network_alpha=64 "
            "--learning_rate=2e-5 --max_train_steps=30000",
    "hand": "train_network.py --network_module=networks.lora --network_train_unet_only --optimizer_type=AdamW "
            "--mixed_precision=bf16 --gradient_accumulation_steps=4 --network_dim=256 --network_alpha=128 "
            "--learning_rate=1e-5 --max_train_steps=60000",
    "gates": "train_moe.py --network_module_lora=networks.lora --network_module_moe=networks.moe "
             "--network_dim_face=256 --network_dim_hand=256 --network_alpha_face=64 --network_alpha_hand=128 "
             "--face_network_weights=<face> --hand_network_weights=<hand> --learning_rate=1e-5 "
             "--max_train_steps=50000 --optimizer_type=AdamW --mixed_precision=bf16 --network_train_unet_only "
             "--gradient_accumulation_steps=6",
}


def _dataset(folder: Path, images: Path, batch_size: int) -> Path:
    """The authors' dataset TOML (batch size, no caption shuffling, keep_tokens 1, a metadata file) at 64 px."""
    meta = folder / "meta_cap.json"
    meta.write_text(json.dumps({p.stem: {"caption": p.with_suffix(".caption").read_text()}
                                for p in sorted(images.glob("*.png"))}))
    toml = folder / f"dataset_{batch_size}.toml"
    toml.write_text(f'[general]\nshuffle_caption = false\nkeep_tokens = 1\n\n[[datasets]]\nresolution = 64\n'
                    f'batch_size = {batch_size}\n  [[datasets.subsets]]\n  image_dir = "{images}"\n'
                    f'  metadata_file = "{meta}"\n')
    return toml


def _run(command: str, ours: list[str]) -> str:
    script, *flags = shlex.split(command)
    flags = [re.sub(r"^--max_train_steps=\d+$", "--max_train_steps=2", f) for f in flags]    # test size
    done = subprocess.run([sys.executable, "-m", "trainer", SCRIPTS[script], *flags, *ours], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def authors_runs(comfy, detectable, train_images, module_tmp):
    out = module_tmp("authors")
    common = ["--pretrained_model_name_or_path", str(detectable), "--output_dir", str(out)]
    logs = {"stage 1": _run(AUTHORS["stage 1"], common + ["--dataset_config", str(_dataset(out, train_images, 4)),
                                                          "--output_name", "stage1"])}
    stage1 = out / "stage1.safetensors"
    experts = {}
    for role in ("face", "hand"):
        logs[role] = _run(AUTHORS[role], ["--pretrained_model_name_or_path", str(stage1), "--output_dir", str(out),
                                          "--dataset_config", str(_dataset(out, train_images, 4)),
                                          "--output_name", role])
        experts[role] = out / f"{role}.safetensors"
    gates_command = AUTHORS["gates"].replace("<face>", str(experts["face"])).replace("<hand>", str(experts["hand"]))
    logs["gates"] = _run(gates_command, ["--pretrained_model_name_or_path", str(stage1), "--output_dir", str(out),
                                         "--dataset_config", str(_dataset(out, train_images, 3)),
                                         "--output_name", "gates"])
    return {"stage1": stage1, **experts, "gates": out / "gates.safetensors", "logs": logs}


def test_the_authors_four_commands_run_and_say_what_has_no_effect(authors_runs):
    logs = authors_runs["logs"]
    assert "--xformers: no effect here" in logs["stage 1"] and "--diffusers_xformers: no effect here" in logs["stage 1"]
    assert "--sample_every_n_steps 500 without --sample_prompts: nothing to sample" in logs["stage 1"]
    assert "--network_train_unet_only: no effect here" in logs["face"]
    assert "--network_dim_face 256: no effect here" in logs["gates"]
    for name in ("stage1", "face", "hand", "gates"):
        assert authors_runs[name].is_file(), name


def test_their_outputs_load_in_our_loaders_and_the_stock_lora_loader(authors_runs, caplog):
    import comfy.sd
    import comfy.utils

    from comfyui_mole.mole_ops.mixture import build
    from comfyui_mole.trainer.training.model import Base

    base = Base(authors_runs["stage1"])                  # the stage-1 file through the stock checkpoint loader
    experts = []
    for role, alpha in (("face", 64.0), ("hand", 128.0)):
        lora = comfy.utils.load_torch_file(str(authors_runs[role]), safe_load=True)
        with caplog.at_level(logging.WARNING):
            model, _ = comfy.sd.load_lora_for_models(base.patcher, base.clip, lora, 1.0, 1.0)
        assert "lora key not loaded" not in caplog.text and len(model.patches) == len(base.layout.layer_keys)
        expert = expert_file.load(authors_runs[role], role)
        assert expert.ranks == {256} and expert.alphas == {alpha}
        experts.append(expert)
    gates = gate_file.load(authors_runs["gates"])
    assert gates.experts == ("face", "hand")
    mole = build(experts, gates, base.layout)
    assert sorted(mole.keys) == sorted(base.layout.layer_keys)


def test_noise_variants_epochs_and_training_comment(detectable, train_images, tmp_path):
    """--noise_offset, --multires_noise_iterations, --ip_noise_gamma and --loss_type huber each change the loss of the
    same seeded run; --save_precision fp16 writes half-precision tensors;
    --max_train_epochs and --save_every_n_epochs count kohya's epochs; --training_comment lands in the metadata."""
    from comfyui_mole.trainer.training import config as cfg
    from comfyui_mole.trainer.training.loop import Run

    common = ["--pretrained_model_name_or_path", str(detectable), "--train_data_dir", str(train_images),
              "--resolution", "64", "--network_dim", "4", "--train_batch_size", "4", "--seed", "3",
              "--cache_latents", "--output_dir", str(tmp_path)]
    runs = {"plain": [], "offset": ["--noise_offset", "0.1", "--training_comment", "run 3, offset 0.1",
                                    "--save_precision", "fp16"],
            "multires": ["--multires_noise_iterations", "6", "--multires_noise_discount", "0.3"],
            "perturbed": ["--ip_noise_gamma", "0.1"], "huber": ["--loss_type", "huber", "--huber_c", "0.1"]}
    losses = {}
    for name, extra in runs.items():
        args = argparse_namespace(common + ["--max_train_steps", "2", "--output_name", name] + extra)
        r = Run(cfg.from_args(args, "expert"))
        r.train()
        r.stage.detach()
        losses[name] = [row.split(",")[1] for row in (tmp_path / f"{name}_log.csv").read_text().splitlines()[1:]]
    assert all(losses[name] != losses["plain"] for name in ("offset", "multires", "perturbed", "huber")), losses
    tensors, meta, _ = safetensors_io.read(tmp_path / "offset.safetensors")
    assert meta["ss_training_comment"] == "run 3, offset 0.1"
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}      # --save_precision
    assert expert_file.load(tmp_path / "offset.safetensors", "x").ranks == {4}
    # 8 pictures in batches of 4: an epoch is 2 steps
    r = Run(cfg.from_args(argparse_namespace(common + ["--max_train_epochs", "2", "--save_every_n_epochs", "1",
                                                       "--output_name", "epochs"]), "expert"))
    assert (r.config.max_train_steps, r.config.save_every_n_steps) == (4, 2)
    r.train()
    r.stage.detach()
    assert (tmp_path / "epochs-step00000002.safetensors").is_file() and (tmp_path / "epochs.safetensors").is_file()
    assert len((tmp_path / "epochs_log.csv").read_text().splitlines()) == 1 + 4


def test_dropout_max_norm_crops_colours_and_reader_threads(detectable, train_images, tmp_path, caplog):
    """--network_dropout and --random_crop / --color_aug each change the loss of the same seeded run;
    --max_data_loader_n_workers reads the pictures on threads and changes nothing else (bitwise);
    --scale_weight_norms keeps every layer's LoRA delta at or under its norm and reports the layers it scaled."""
    from comfyui_mole.trainer.training import config as cfg
    from comfyui_mole.trainer.training.loop import Run, train

    common = ["--pretrained_model_name_or_path", str(detectable), "--train_data_dir", str(train_images),
              "--resolution", "64", "--network_dim", "4", "--train_batch_size", "4", "--seed", "5",
              "--learning_rate", "1e-2", "--max_train_steps", "2", "--output_dir", str(tmp_path)]
    runs = {"plain": [], "dropout": ["--network_dropout", "0.5"], "crop": ["--random_crop"],
            "color": ["--color_aug"], "threads": ["--max_data_loader_n_workers", "2"],
            "max_norm": ["--scale_weight_norms", "0.002"]}
    losses, kept = {}, {}
    for name, extra in runs.items():
        config = cfg.from_args(argparse_namespace(common + ["--output_name", name] + extra), "expert")
        if name == "max_norm":
            r = Run(config)
            r.train()
            r.stage.detach()
            kept["norms"], kept["stage"] = r.norms, r.stage
        else:
            train(config)
        losses[name] = [row.split(",")[1] for row in (tmp_path / f"{name}_log.csv").read_text().splitlines()[1:]]
    assert losses["threads"] == losses["plain"], losses
    assert all(losses[name] != losses["plain"] for name in ("dropout", "crop", "color")), losses
    scaled, mean, largest = kept["norms"]
    stage = kept["stage"]
    assert scaled > 0 and largest <= 0.002 * (1 + 1e-5) and 0 < mean <= largest * (1 + 1e-9)
    for _, layer in stage.mole.items():
        lora = layer.experts[stage.expert.name]
        assert float((lora.up @ lora.down).detach().norm()) * lora.scale <= 0.002 * (1 + 1e-4)
    saved = expert_file.load(tmp_path / "max_norm.safetensors", "x")
    assert all(float((w.up.float() @ w.down.float()).norm()) * w.alpha / 4 <= 0.002 * (1 + 1e-3)
               for w in saved.layers.values())


def test_a_v_prediction_fine_tune_is_marked_and_samples(detectable, train_images, tmp_path, monkeypatch):
    """train-base --v_parameterization --zero_terminal_snr: the target is v on the rescaled schedule, the samples
    while training go through ComfyUI's v-prediction sampling, and the checkpoint carries ComfyUI's `v_pred` and
    `ztsnr` markers (its SDXL loader reads them) and modelspec.prediction_type v; it loads in the stock loader. A
    base that ComfyUI loads as v-prediction is refused without the flag."""
    import comfy.sd

    from comfyui_mole.trainer.training import config as cfg
    from comfyui_mole.trainer.training.config import ConfigError
    from comfyui_mole.trainer.training.loop import Run
    from comfyui_mole.trainer.training.model import Base

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person waving --w 64 --h 64 --s 2 --d 1\n")
    argv = ["--pretrained_model_name_or_path", str(detectable), "--train_data_dir", str(train_images),
            "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", "2", "--output_dir", str(tmp_path),
            "--output_name", "vpred", "--learning_rate", "1e-5", "--sample_prompts", str(prompts),
            "--sample_every_n_steps", "2"]
    parser = __import__("argparse").ArgumentParser()
    cfg.add_arguments(parser, "finetune")
    r = Run(cfg.from_args(parser.parse_args(argv + ["--v_parameterization", "--zero_terminal_snr"]), "finetune"))
    assert r.base.v_prediction and r.base.alphas_cumprod[-1] == 0
    path = r.train()
    r.stage.detach()
    assert len(list((tmp_path / "sample").glob("vpred_000002_*.png"))) == 1
    tensors, meta, _ = safetensors_io.read(path)
    assert "v_pred" in tensors and "ztsnr" in tensors and meta["modelspec.prediction_type"] == "v"
    patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    assert patcher is not None and clip is not None and vae is not None
    monkeypatch.setattr(Base, "loaded_as_v", property(lambda self: True))     # an SDXL v-pred file (1.9 GB here)
    with pytest.raises(ConfigError, match="ComfyUI loads this checkpoint as a v-prediction model; give "
                                          "--v_parameterization"):
        Run(cfg.from_args(parser.parse_args(argv), "finetune"))


def argparse_namespace(argv: list[str]):
    import argparse

    from comfyui_mole.trainer.training import config as cfg

    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, "expert")
    return parser.parse_args(argv)
