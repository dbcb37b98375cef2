"""Trainer configuration: kohya flag names, TOML config, precedence, and errors before any work starts."""
import argparse

import pytest

from comfyui_mole.trainer.training import config as cfg
from comfyui_mole.trainer.training import kohya
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


# -- kohya's flags under other names (training/kohya.py) -----------------------------------------------------------
# The 33 flags of kohya's train_network.py / fine_tune.py that a user tried and argparse refused (issue 33)
ISSUE_33 = ["network_train_unet_only", "xformers", "sdpa", "max_train_epochs", "save_every_n_epochs", "noise_offset",
            "multires_noise_iterations", "ip_noise_gamma", "unet_lr", "text_encoder_lr", "caption_dropout_rate",
            "network_args", "network_dropout", "scale_weight_norms", "save_model_as", "save_precision",
            "training_comment", "max_data_loader_n_workers", "persistent_data_loader_workers",
            "lr_scheduler_num_cycles", "lr_scheduler_args", "loss_type", "huber_c", "v_parameterization",
            "zero_terminal_snr", "prior_loss_weight", "full_fp16", "full_bf16", "max_token_length", "sample_sampler",
            "logging_dir", "log_with", "dim_from_weights"]
# a value each flag accepts, and one it refuses (None: no refused value, or a switch)
VALUES = {"logging_dir": ("logs", None), "log_with": ("tensorboard", None),
          "sample_sampler": ("euler_a", None), "max_token_length": ("75", "225"), "prior_loss_weight": ("1.0", "0.5"),
          "loss_type": ("l2", "huber"), "lr_scheduler_num_cycles": ("1", "3"), "save_precision": ("float", "fp16"),
          "save_model_as": ("safetensors", "ckpt"), "network_dim_face": ("256", None),
          "network_dim_hand": ("256", None),
          "network_alpha_face": ("64", None), "network_alpha_hand": ("128", None),
          "network_module_lora": ("networks.lora", "lycoris.kohya"), "network_module_moe": ("networks.moe", "x")}


def test_each_of_the_issues_33_flags_is_known_to_the_parser(paths):
    """None of them ends in argparse's bare "unrecognized arguments" any more."""
    native = set(cfg._fields())
    for name in ISSUE_33:
        assert name in native or name in kohya.BY_NAME, name
    assert len(ISSUE_33) == 33


@pytest.mark.parametrize("flag", [f for f in kohya.REGISTRY], ids=lambda f: f.name)
def test_every_registry_flag_does_what_its_class_says(paths, flag, caplog):
    stage = "expert" if flag.name == "text_encoder_lr" else flag.stages[0]      # stage 1: its own test
    args = base_args(paths) + (["--experts", f"face={paths['expert']}"] if stage == "gates" and
                               not flag.name.endswith("network_weights") else [])
    good, bad = VALUES.get(flag.name, (None, None))
    given = [f"--{flag.name}"] if flag.switch else [f"--{flag.name}", good or paths["expert"] if "weights" in
                                                    flag.name else good or "0.5"]
    if flag.kind == kohya.REFUSED:
        with pytest.raises(ConfigError, match=rf"--{flag.name}.*: not supported: "):
            parse(stage, args + given)
        return
    with caplog.at_level("INFO", logger="mole.train"):
        c = parse(stage, args + given)
    if flag.kind == kohya.NO_OP:
        assert f"--{flag.name}" in caplog.text and "no effect here" in caplog.text, caplog.text
    if bad is not None:
        with pytest.raises(ConfigError, match=rf"--{flag.name} {bad}: not supported: "):
            parse(stage, args + [f"--{flag.name}", bad])
    expected = {"use_lion_optimizer": ("optimizer_type", "Lion"), "unet_lr": ("learning_rate", 0.5),
                "face_network_weights": ("experts", [f"face={paths['expert']}"]),
                "hand_network_weights": ("experts", [f"hand={paths['expert']}"])}
    if flag.name in expected:
        key, value = expected[flag.name]
        assert getattr(c, key) == value


def test_text_encoder_lr_sets_stage_1s_and_is_noted_elsewhere(paths, caplog):
    c = parse("finetune", base_args(paths) + ["--train_text_encoder", "--text_encoder_lr", "3e-6"])
    assert c.learning_rate_te == 3e-6
    with caplog.at_level("INFO", logger="mole.train"):
        c = parse("expert", base_args(paths) + ["--text_encoder_lr", "3e-6"])
    assert c.learning_rate_te is None and "--text_encoder_lr 3e-6: no effect in this stage" in caplog.text


def test_kohya_flags_in_a_config_file_and_the_authors_expert_pair(paths, caplog):
    toml = paths["dir"] / "kohya.toml"
    toml.write_text('save_model_as = "safetensors"\nxformers = true\nnoise_offset = 0.05\n'
                    'training_comment = "face expert, run 3"\nv_parameterization = false\n')
    with caplog.at_level("INFO", logger="mole.train"):
        c = parse("expert", ["--config_file", str(toml)] + base_args(paths))
    assert c.noise_offset == 0.05 and c.training_comment == "face expert, run 3"
    assert "save_model_as safetensors: no effect here" in caplog.text
    toml.write_text('save_model_as = "ckpt"\n')
    with pytest.raises(ConfigError, match=r"kohya.toml: save_model_as ckpt: not supported: files are always "):
        parse("expert", ["--config_file", str(toml)] + base_args(paths))
    c = parse("gates", base_args(paths) + ["--face_network_weights", paths["expert"], "--hand_network_weights",
                                           paths["expert"]])
    assert c.experts == [f"face={paths['expert']}", f"hand={paths['expert']}"]
    with pytest.raises(ConfigError, match="give the experts once"):
        parse("gates", base_args(paths) + ["--face_network_weights", paths["expert"], "--experts",
                                           f"face={paths['expert']}"])
    with pytest.raises(ConfigError, match="a kohya flag of train-gates, not of this stage"):
        parse("expert", base_args(paths) + ["--face_network_weights", paths["expert"]])
    with pytest.raises(ConfigError, match="--noise_offset must be from 0 to 1"):
        parse("expert", base_args(paths) + ["--noise_offset", "2"])


def test_the_compatibility_table_is_current():
    assert kohya.DOC.read_text() == kohya.table(kohya.native_options()), \
        "docs/kohya.md is stale: run `python -m trainer kohya-table`"


# -- every option of the table reaches the resolved configuration ----------------------------------------------------
# what each option needs beside it, and the value it then holds: (extra argv, value given, expected); a missing
# option takes 2 (int), 0.5 (float), its last choice, or a file
NEEDS = {"lr_warmup_steps": (["--lr_scheduler", "cosine"], "2", 2),
         "lr_scheduler_num_cycles": (["--lr_scheduler", "cosine_with_restarts"], "3", 3),
         "lr_scheduler_args": (["--lr_scheduler", "cosine"], "num_cycles=1.5", ["num_cycles=1.5"]),
         "learning_rate_te": (["--train_text_encoder"], "3e-6", 3e-6),
         "conditioning_data_dir": (["--masked_loss"], "DATA", "DATA"),
         "save_state": (["--save_every_n_steps", "2"], None, True),
         "sample_prompts": (["--sample_every_n_steps", "2"], "FILE", "FILE"),
         "zero_terminal_snr": (["--v_parameterization"], None, True),
         "mixed_precision": ([], "bf16", "bf16"), "optimizer_type": ([], "Lion", "Lion"),
         "resolution": ([], "64,96", "64,96"), "experts": ([], "face=FILE", ["face=FILE"]),
         "optimizer_args": ([], "weight_decay=0.01", ["weight_decay=0.01"]),
         "huber_c": ([], "0.2", 0.2), "expert_name": ([], "face", "face"),
         "network_module": ([], "networks.lora", "networks.lora"), "save_precision": ([], "fp16", "fp16")}
NOT_ALONE = {"dataset_config": "the tests' base arguments give --train_data_dir (one of the two)",
             "train_data_dir": "in the base arguments", "pretrained_model_name_or_path": "in the base arguments",
             "output_dir": "in the base arguments", "output_name": "in the base arguments"}


@pytest.mark.parametrize("name", [n for n in cfg._fields() if n not in NOT_ALONE])
def test_every_option_reaches_the_resolved_configuration(paths, name):
    f = cfg._fields()[name]
    stage = "expert" if cfg.uses(f, "expert") else f.metadata["stages"][0]
    if stage == "finetune" and name == "save_precision":
        stage = "expert"
    extra, given, expected = NEEDS.get(name, ([], "", None))
    if name not in NEEDS:
        if f.type == "bool":
            given, expected = None, True
        elif f.type == "int":
            given, expected = "2", 2
        elif f.type == "float":
            given, expected = "0.5", 0.5
        elif f.metadata["choices"]:
            given = expected = f.metadata["choices"][-1]
        else:
            given = expected = "FILE"
    swap = {"FILE": paths["expert"], "DATA": paths["data"], "face=FILE": f"face={paths['expert']}"}
    value = [swap.get(given, given)] if given is not None else []
    expected = [swap.get(e, e) for e in expected] if isinstance(expected, list) else swap.get(expected, expected)
    args = base_args(paths) + (["--experts", f"face={paths['expert']}"] if stage == "gates" and name != "experts"
                               else []) + extra
    c = parse(stage, args + [f"--{name}"] + value)
    assert getattr(c, name) == expected, (name, getattr(c, name))


@pytest.mark.parametrize("extra,message", [
    (["--zero_terminal_snr"], "--zero_terminal_snr needs --v_parameterization"),
    (["--lr_scheduler_args", "num_cycles=2"], r"the constant schedule takes no arguments here"),
    (["--lr_scheduler", "cosine", "--lr_scheduler_args", "power=2"], "the cosine schedule takes num_cycles here"),
    (["--lr_scheduler", "cosine", "--lr_scheduler_args", "num_cycles"], "give key=value"),
    (["--lr_scheduler", "cosine", "--lr_scheduler_args", "num_cycles=x("], "is not a Python literal"),
    (["--lr_scheduler", "cosine", "--lr_scheduler_args", "num_cycles=-1"], "num_cycles must be a number > 0"),
    (["--network_dropout", "1"], r"--network_dropout must be in \[0, 1\)"),
    (["--scale_weight_norms", "0"], "--scale_weight_norms must be > 0"),
    (["--max_data_loader_n_workers", "-1"], "--max_data_loader_n_workers must be >= 0"),
    (["--torch_compile", "--dynamo_backend", "tensort"], "--dynamo_backend tensort: not a torch.compile backend of "
                                                         "this PyTorch"),
])
def test_the_new_kohya_options_are_checked(paths, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse("expert", base_args(paths) + extra)


def test_torch_compile_is_kohyas_flag_and_its_failures_name_it(paths):
    """--torch_compile and --dynamo_backend as kohya spells them (inductor by default); a backend given without
    --torch_compile changes nothing (as in kohya); torch.compile's own failure reads as a ConfigError naming both."""
    import torch._dynamo.exc

    from comfyui_mole.trainer.training.loop import compile_errors

    c = parse("gates", base_args(paths) + ["--experts", f"face={paths['expert']}", "--torch_compile"])
    assert c.torch_compile and c.dynamo_backend == "inductor"
    assert not parse("expert", base_args(paths) + ["--dynamo_backend", "tensort"]).torch_compile
    with pytest.raises(ConfigError, match=r"--torch_compile \(--dynamo_backend inductor\) failed: no C\+\+ compiler"):
        with compile_errors(c):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler\nthe rest")
    with pytest.raises(ValueError, match="other"), compile_errors(c):
        raise ValueError("other")
