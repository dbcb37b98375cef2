"""Trainer configuration: kohya flag names, TOML config, precedence, and errors before any work starts."""
import argparse

import pytest

from comfyui_mole.trainer.training import config as cfg
from comfyui_mole.trainer.training.config import ConfigError


@pytest.fixture
def paths(tmp_path):
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"x")
    data = tmp_path / "data"
    data.mkdir()
    expert = tmp_path / "face.safetensors"
    expert.write_bytes(b"x")
    return {"ckpt": str(ckpt), "data": str(data), "out": str(tmp_path / "out"), "expert": str(expert),
            "dir": tmp_path}


def parse(stage, argv):
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, stage)
    return cfg.from_args(parser.parse_args(argv), stage)


def base_args(p):
    return ["--pretrained_model_name_or_path", p["ckpt"], "--train_data_dir", p["data"], "--output_dir", p["out"],
            "--output_name", "x"]


def test_kohya_flags_and_defaults(paths):
    c = parse("expert", base_args(paths) + ["--network_dim", "8", "--network_alpha", "4", "--resolution", "64,96",
                                            "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.99"])
    assert (c.network_dim, c.network_alpha, c.size) == (8, 4.0, (64, 96))
    assert c.optimizer_kwargs() == {"weight_decay": 0.01, "betas": (0.9, 0.99)}
    assert c.max_grad_norm == 1.0 and c.lr_scheduler == "constant" and c.optimizer_type == "AdamW"


def test_toml_config_and_command_line_wins(paths):
    toml = paths["dir"] / "train.toml"
    toml.write_text(f'pretrained_model_name_or_path = "{paths["ckpt"]}"\ntrain_data_dir = "{paths["data"]}"\n'
                    f'output_dir = "{paths["out"]}"\noutput_name = "from_toml"\nlearning_rate = 2e-5\n'
                    'max_train_steps = 30\nresolution = [64, 96]\n')
    c = parse("expert", ["--config_file", str(toml), "--learning_rate", "1e-3"])
    assert c.learning_rate == 1e-3 and c.max_train_steps == 30 and c.output_name == "from_toml"
    assert c.size == (64, 96)


@pytest.mark.parametrize("toml,message", [
    ("learning_rat = 1e-3", "unknown option 'learning_rat'"),
    ("network_dim = 8", "'network_dim' is not used by train-gates"),
    ("max_train_steps = 'ten'", "max_train_steps = 'ten' should be of type int"),
])
def test_bad_toml_fails(paths, toml, message):
    path = paths["dir"] / "bad.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=message):
        parse("gates", ["--config_file", str(path)] + base_args(paths) + ["--experts", f"face={paths['expert']}"])


@pytest.mark.parametrize("extra,message", [
    (["--dataset_config", "x.toml"], "exactly one of --dataset_config and --train_data_dir"),
    (["--mixed_precision", "fp16"], "fp16 needs a GPU"),
    (["--optimizer_type", "AdamW8bit"], "AdamW8bit needs bitsandbytes and a GPU"),
    (["--save_state"], "give --save_every_n_steps too"),
    (["--lr_warmup_steps", "10"], "needs a scheduler with warm-up"),
    (["--sample_prompts", "p.txt"], "no such file"),
    (["--resume", "nowhere"], "--resume nowhere: no such file"),
    (["--resolution", "65"], "multiples of 8"),
    (["--network_module", "lycoris.kohya"], "only networks.lora"),
    (["--expert_name", "face hand"], "expert name 'face hand'"),
    (["--caption_dropout_rate", "1.5"], "--caption_dropout_rate must be from 0 to 1"),
])
def test_contradictions_fail_before_work(paths, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse("expert", base_args(paths) + extra)


def test_gates_stage_needs_experts_and_rejects_expert_flags(paths):
    with pytest.raises(ConfigError, match="--experts is required"):
        parse("gates", base_args(paths))
    with pytest.raises(ConfigError, match="face=nowhere.safetensors: no such file"):
        parse("gates", base_args(paths) + ["--experts", "face=nowhere.safetensors"])
    with pytest.raises(SystemExit):          # argparse: unknown to train-gates
        parse("gates", base_args(paths) + ["--network_dim", "4"])
    c = parse("gates", base_args(paths) + ["--experts", f"face={paths['expert']}", f"hand={paths['expert']}"])
    assert list(c.expert_paths()) == ["face", "hand"] and c.gate_variant == "official"


def test_stage1_text_encoder_options(paths):
    c = parse("finetune", base_args(paths) + ["--train_text_encoder", "--learning_rate_te", "1e-6",
                                              "--gradient_checkpointing"])
    assert c.train_text_encoder and c.learning_rate_te == 1e-6 and c.gradient_checkpointing
    with pytest.raises(ConfigError, match="--learning_rate_te goes with --train_text_encoder"):
        parse("finetune", base_args(paths) + ["--learning_rate_te", "1e-6"])
    with pytest.raises(SystemExit):          # argparse: stage 1 only
        parse("expert", base_args(paths) + ["--train_text_encoder"])
    toml = paths["dir"] / "c.toml"
    toml.write_text("train_text_encoder = true\n")
    with pytest.raises(ConfigError, match="'train_text_encoder' is not used by train-gates"):
        parse("gates", ["--config_file", str(toml)] + base_args(paths) + ["--experts", f"face={paths['expert']}"])
    with pytest.raises(ConfigError, match="--cache_text_encoder_outputs needs a frozen text encoder"):
        parse("finetune", base_args(paths) + ["--train_text_encoder", "--cache_text_encoder_outputs_to_disk"])
    c = parse("finetune", base_args(paths) + ["--cache_text_encoder_outputs_to_disk"])
    assert c.text_encoder_outputs_cached and not c.cache_text_encoder_outputs     # _to_disk implies caching
