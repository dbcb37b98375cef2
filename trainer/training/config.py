"""Training configuration: kohya sd-scripts' flag names, a TOML file of the same names (`--config_file`), and
validation of everything before any work starts.

Precedence: built-in defaults < the TOML file < the command line. Unknown keys, values of the wrong type, and
options the chosen stage does not use are errors, so a typo never trains for hours with a default.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from ...mole_ops.errors import FormatError, MoLEError
from ...mole_ops.expert_file import check_role_name as _check_role_name
from ...mole_ops.ops import VARIANTS
from . import kohya

log = logging.getLogger("mole.train")

SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear")
LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
OPTIMIZERS = ("AdamW", "Lion", "AdamW8bit")
PRECISIONS = ("no", "fp16", "bf16")
# kohya's --dynamo_backend choices (train_util.py), as spelt there
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt",
                   "onnxrt", "tensort", "ipex", "tvm")


class ConfigError(MoLEError):
    """A training argument is unknown, malformed or contradicts another one."""


def read_text(path: Path, what: str) -> str:
    """A text file a user gave (UTF-8), or ConfigError naming it: `what` says which file it is (e.g. '--models')."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from e


def _opt(help: str, default=None, stages=None, choices=None, nargs=None):
    """A field with its help text and the stages (names in training/stages.py) that use it; None = every stage."""
    return field(default=default, metadata={"help": help, "stages": stages, "choices": choices, "nargs": nargs})


def uses(f, stage: str) -> bool:
    return f.metadata["stages"] is None or stage in f.metadata["stages"]


@dataclass
class TrainConfig:
    """All arguments of `train-base` (stage 1), `train-expert` (stage 2) and `train-gates` (stage 3). Names are
    kohya's where the meaning matches; the MoLE-specific ones are marked in their help."""

    stage: str = "expert"
    # model and data
    pretrained_model_name_or_path: str = _opt("base checkpoint (.safetensors), loaded with ComfyUI's loader")
    dataset_config: str = _opt("kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]])")
    train_data_dir: str = _opt("folder of images with caption files (instead of --dataset_config)")
    in_json: str = _opt("kohya fine-tune metadata JSON/JSONL for --train_data_dir")
    caption_extension: str = _opt("caption file extension", ".caption")
    resolution: str = _opt("training resolution: 'S' or 'W,H'", "512")
    enable_bucket: bool = _opt("aspect-ratio bucketing: batch images of similar shape at a size near their own",
                               False)
    min_bucket_reso: int = _opt("smallest bucket side", 256)
    max_bucket_reso: int = _opt("largest bucket side", 1024)
    bucket_reso_steps: int = _opt("bucket sides are multiples of this", 64)
    bucket_no_upscale: bool = _opt("never enlarge an image: small images get a bucket of their own size", False)
    cache_latents: bool = _opt("encode every image once before training, keep latents in memory", False)
    cache_latents_to_disk: bool = _opt("like --cache_latents, also kept on disk across runs", False)
    cache_text_encoder_outputs: bool = _opt("encode every caption once before training and keep the outputs for "
                                            "the run (a frozen text encoder's outputs are reused anyway: this "
                                            "does it up front, with a progress bar); not with --train_text_encoder",
                                            False)
    cache_text_encoder_outputs_to_disk: bool = _opt("like --cache_text_encoder_outputs, also kept on disk (in "
                                                    "output_dir/text_cache) for later runs", False)
    noise_offset: float = _opt("kohya's noise offset: add this times a per-image, per-channel normal draw to the "
                               "noise (darker darks and brighter brights; 0.05-0.1 is usual); off when not given")
    multires_noise_iterations: int = _opt("kohya's multi-resolution (pyramid) noise: add this many levels of "
                                          "upsampled coarser noise (6-10 is usual); off when not given")
    multires_noise_discount: float = _opt("weight of each coarser level of --multires_noise_iterations (level i: "
                                          "discount^i)", 0.3)
    ip_noise_gamma: float = _opt("kohya's input perturbation: the noisy latent gets gamma times extra noise the "
                                 "target does not contain (0.1 is usual); off when not given")
    v_parameterization: bool = _opt("train the UNet to predict v = sqrt(abar) eps - sqrt(1 - abar) x_0 instead of "
                                     "the noise (v-prediction bases; a train-base fine-tune becomes one: sample it "
                                     "with ModelSamplingDiscrete v_prediction, SDXL files are marked and load so)",
                                     False)
    zero_terminal_snr: bool = _opt("rescale the noise schedule so that the last timestep is pure noise (Lin et al. "
                                   "2023, as kohya does); needs --v_parameterization", False)
    random_crop: bool = _opt("crop each picture at a random place instead of its centre, anew every step (also a "
                             "dataset subset key; not with --cache_latents)", False)
    color_aug: bool = _opt("kohya's colour augmentation: a third of the time a hue shift (up to 8 of 180) or a "
                           "gamma in [0.95, 1.05], anew every step (also a subset key; not with --cache_latents)",
                           False)
    max_data_loader_n_workers: int = _opt("threads that read and decode a batch's pictures in parallel (at most the "
                                          "CPU count; no effect with --cache_latents, where nothing is read while "
                                          "training); default: read in the training thread")
    caption_dropout_rate: float = _opt("train on an empty caption with this probability (the unconditional "
                                       "prediction classifier-free guidance needs; also a dataset subset key)",
                                       0.0)
    masked_loss: bool = _opt("compute the loss only where each image's mask is white (gray = partly), the mask "
                             "downsampled to latent resolution: masks from a subset's conditioning_data_dir (same "
                             "file names) or, with alpha_mask, the images' alpha channel", False)
    alpha_mask: bool = _opt("the images' alpha channel is their loss mask (implies --masked_loss; also a dataset "
                            "subset key)", False)
    conditioning_data_dir: str = _opt("folder of mask images named like the training images, for --masked_loss "
                                      "with --train_data_dir (a dataset subset key too)")
    # output
    output_dir: str = _opt("folder for the trained file, states, samples and logs")
    output_name: str = _opt("file name of the trained file, without extension")
    save_every_n_steps: int = _opt("also save the trained file every N steps")
    save_every_n_epochs: int = _opt("also save the trained file every N epochs (at the steps where they end)")
    save_state: bool = _opt("with each save, also save the full training state (for --resume)", False)
    save_precision: str = _opt("dtype of the saved expert or gate file: float (float32, as trained), fp16 or bf16 "
                               "(half the size); train-base writes its checkpoint as ComfyUI holds the model",
                               "float", choices=("float", "fp16", "bf16"))
    training_comment: str = _opt("a comment written into the trained file's metadata (ss_training_comment, as "
                                 "kohya writes it)")
    resume: str = _opt("resume from a state folder written by --save_state")
    # optimisation
    train_batch_size: int = _opt("batch size (a dataset TOML may set its own)", 1)
    gradient_accumulation_steps: int = _opt("batches per optimizer step", 1)
    max_train_steps: int = _opt("optimizer steps to train", 1600)
    max_train_epochs: int = _opt("train this many passes over the data instead (overrides --max_train_steps: "
                                 "an epoch is the dataset's batches / --gradient_accumulation_steps steps)")
    learning_rate: float = _opt("learning rate", 1e-4)
    lr_scheduler: str = _opt("learning-rate schedule", "constant", choices=SCHEDULERS)
    lr_warmup_steps: int = _opt("warm-up steps (constant_with_warmup, cosine, cosine_with_restarts, linear)", 0)
    lr_scheduler_num_cycles: int = _opt("cosine_with_restarts: how many times the cosine restarts from the top", 1)
    lr_scheduler_args: list = _opt("extra arguments of the schedule as kohya passes them, key=value: num_cycles=N "
                                   "for cosine (half-periods of the cosine; 0.5, the default, decays once to 0)",
                                   None, nargs="*")
    loss_type: str = _opt("the loss of the noise prediction: l2 (the paper's), or kohya's huber and smooth_l1 "
                          "(less pull from outliers)", "l2", choices=LOSS_TYPES)
    huber_c: float = _opt("huber / smooth_l1: the threshold between squared and linear error (scheduled per "
                          "timestep by --huber_schedule)", 0.1)
    huber_schedule: str = _opt("how --huber_c varies with the timestep, as kohya: snr (default), exponential, or "
                               "constant", "snr", choices=HUBER_SCHEDULES)
    optimizer_type: str = _opt("optimizer", "AdamW", choices=OPTIMIZERS)
    optimizer_args: list = _opt("extra optimizer arguments, e.g. weight_decay=0.01 betas=0.9,0.99", None, nargs="*")
    max_grad_norm: float = _opt("clip the gradient norm to this (0 = off)", 1.0)
    min_snr_gamma: float = _opt("Min-SNR-gamma loss weighting (SPEC.md section 5); off when not given")
    clip_skip: int = _opt("use the output of the n-th last CLIP layer (1 = last)")
    mixed_precision: str = _opt("autocast precision (bf16 runs on CPU; fp16 needs a GPU)", "no", choices=PRECISIONS)
    seed: int = _opt("seed of data order, noise, timesteps and new weights", 42)
    gradient_checkpointing: bool = _opt("recompute activations in the backward pass: less memory, about a third "
                                        "more time", False)
    torch_compile: bool = _opt("run the UNet (with the stage's experts and gates) through torch.compile: the "
                               "first steps compile it (about 2 minutes for a small UNet on 2 CPU cores), later ones "
                               "are faster where many small operations dominate (stage 3 on a CPU); inductor needs "
                               "a C++ compiler on a CPU and Triton on a GPU", False)
    dynamo_backend: str = _opt("torch.compile's backend with --torch_compile (kohya's choices; those this PyTorch "
                               "lacks are refused)", "inductor", choices=DYNAMO_BACKENDS)
    # samples while training
    sample_prompts: str = _opt("kohya prompt file: one prompt per line, options --n --w --h --d --l --s")
    sample_every_n_steps: int = _opt("sample the prompts every N steps")
    # stage 1: the fine-tune
    train_text_encoder: bool = _opt("also train the text encoder (the paper's stage 1; the authors' latest command "
                                    "trains the UNet only)", False, stages=("finetune",))
    learning_rate_te: float = _opt("learning rate of the text encoder (default: --learning_rate)",
                                   stages=("finetune",))
    # stage 2: the expert (a kohya LoRA)
    network_module: str = _opt("kohya network module; only networks.lora", "networks.lora", stages=("expert",))
    network_dim: int = _opt("LoRA rank", 4, stages=("expert",))
    network_alpha: float = _opt("LoRA alpha (scale = alpha / rank)", 1.0, stages=("expert",))
    network_weights: str = _opt("start from this LoRA file instead of a fresh one", stages=("expert",))
    network_dropout: float = _opt("kohya's neuron dropout: while training, each hidden unit of the LoRA (the down "
                                  "projection's output) is zeroed with this probability (0.1 is usual); off when not "
                                  "given", stages=("expert",))
    scale_weight_norms: float = _opt("kohya's max-norm regularisation: after each step every layer whose LoRA "
                                     "delta (scale x up @ down) has a norm above this is scaled back to it (1.0 is "
                                     "usual); the progress bar shows the keys scaled and the mean norm",
                                     stages=("expert",))
    expert_name: str = _opt("[MoLE] the expert's role name written into the file (face, hand, ...)", "expert",
                            stages=("expert",))
    # stage 3: the gates
    experts: list = _opt("[MoLE] the frozen experts as role=path, in column order: face=f.safetensors "
                         "hand=h.safetensors", None, stages=("gates",), nargs="+")
    gate_variant: str = _opt("[MoLE] global-gate variant of fresh gates (a --gate_weights file brings its own)",
                             "official", stages=("gates",), choices=VARIANTS)
    gate_weights: str = _opt("[MoLE] start from this gate file instead of fresh gates", stages=("gates",))
    save_pack: bool = _opt("[MoLE] also write a single-file pack (experts + gates)", False, stages=("gates",))

    # -- derived ---------------------------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        return parse_resolution(self.resolution, "--resolution")

    @property
    def loss_masked(self) -> bool:
        """--alpha_mask implies --masked_loss (as in kohya)."""
        return bool(self.masked_loss or self.alpha_mask)

    @property
    def latents_cached(self) -> bool:
        """--cache_latents_to_disk implies --cache_latents (as in kohya)."""
        return bool(self.cache_latents or self.cache_latents_to_disk)

    @property
    def text_encoder_outputs_cached(self) -> bool:
        """--cache_text_encoder_outputs_to_disk implies --cache_text_encoder_outputs (as in kohya)."""
        return bool(self.cache_text_encoder_outputs or self.cache_text_encoder_outputs_to_disk)

    def expert_paths(self) -> dict[str, Path]:
        out = {}
        for item in self.experts or []:
            name, sep, path = item.partition("=")
            if not sep or not path:
                raise ConfigError(f"--experts {item!r}: give role=path, e.g. face=face.safetensors")
            if name in out:
                raise ConfigError(f"--experts: the role {name!r} is given twice")
            out[check_role_name(name, "--experts")] = Path(path)
        return out

    def scheduler_kwargs(self) -> dict:
        """--lr_scheduler_args as kohya reads them (key=value, the value a Python literal), checked against what
        the chosen schedule takes."""
        import ast

        takes = {"cosine": {"num_cycles"}}.get(self.lr_scheduler, set())
        kwargs = {}
        for item in self.lr_scheduler_args or []:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise ConfigError(f"--lr_scheduler_args {item!r}: give key=value, e.g. num_cycles=1.5")
            if key not in takes:
                raise ConfigError(f"--lr_scheduler_args {item!r}: the {self.lr_scheduler} schedule takes "
                                  f"{', '.join(sorted(takes)) or 'no arguments'} here (cosine_with_restarts: use "
                                  "--lr_scheduler_num_cycles)")
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError) as e:
                raise ConfigError(f"--lr_scheduler_args {item!r}: {value!r} is not a Python literal") from e
            if isinstance(parsed, bool) or not isinstance(parsed, (int, float)) or parsed <= 0:
                raise ConfigError(f"--lr_scheduler_args {item!r}: {key} must be a number > 0")
            kwargs[key] = float(parsed)
        return kwargs

    def optimizer_kwargs(self) -> dict:
        kwargs = {}
        for item in self.optimizer_args or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--optimizer_args {item!r}: give key=value, e.g. weight_decay=0.01")
            try:
                parts = [float(v) for v in value.split(",")]
            except ValueError:
                if value not in ("True", "False"):
                    raise ConfigError(f"--optimizer_args {item!r}: {value!r} is not a number, list or bool")
                parts = [value == "True"]
            kwargs[key] = tuple(parts) if len(parts) > 1 else parts[0]
        return kwargs


def check_role_name(name: str, flag: str = "--expert_name") -> str:
    try:
        return _check_role_name(name)
    except FormatError as e:
        raise ConfigError(f"{flag}: {e}") from e


def parse_resolution(text: str, where: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in str(text).replace(" ", "").split(",")]
    except ValueError as e:
        raise ConfigError(f"{where} {text!r}: give a size like 512 or 512,768") from e
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 8 or any(p % 8 for p in parts):
        raise ConfigError(f"{where} {text!r}: width and height must be multiples of 8 (and at least 8)")
    return parts[0], parts[1]


def _fields() -> dict:
    return {f.name: f for f in fields(TrainConfig) if f.name != "stage"}


def add_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """Every option of `stage` as a kohya-style flag; defaults are applied later (see `from_args`)."""
    parser.add_argument("--config_file", help="TOML file with any of these options (the command line wins)")
    for name, f in _fields().items():
        if not uses(f, stage):
            continue
        kwargs = {"help": f.metadata["help"], "default": argparse.SUPPRESS}
        if f.type == "bool":
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = {"int": int, "float": float}.get(f.type, str)
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
            if f.metadata["nargs"]:
                kwargs["nargs"] = f.metadata["nargs"]
        parser.add_argument(f"--{name}", **kwargs)
    kohya.add_flags(parser, stage)


def _check_type(name: str, value, f, where: str):
    kind = f.type
    ok = {"bool": isinstance(value, bool), "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "list": isinstance(value, list) and all(isinstance(v, str) for v in value)}.get(kind, isinstance(value, str))
    if name == "resolution" and isinstance(value, (int, list)):
        return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    if not ok:
        raise ConfigError(f"{where}: {name} = {value!r} should be of type {kind}")
    return float(value) if kind == "float" else value


def from_args(args: argparse.Namespace, stage: str) -> TrainConfig:
    """defaults < --config_file TOML < command line; then `validate`."""
    values: dict = {}
    known = _fields()
    if getattr(args, "config_file", None):
        path = Path(args.config_file)
        try:
            toml = tomllib.loads(read_text(path, "--config_file"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config_file {path}: {e}") from e
        aliases = {k: v for k, v in toml.items() if k in kohya.BY_NAME}
        values.update(kohya.resolve(aliases, stage, str(path)))
        for key, value in toml.items():
            if key in aliases:
                continue
            if key not in known:
                raise ConfigError(f"{path}: unknown option {key!r} (see --help for the options)")
            if not uses(known[key], stage):
                raise ConfigError(f"{path}: option {key!r} is not used by train-{stage}")
            values[key] = _check_type(key, value, known[key], str(path))
    mapped = kohya.resolve({k: v for k, v in vars(args).items() if k in kohya.BY_NAME}, stage)
    native = {k: v for k, v in vars(args).items() if k in known}
    if "experts" in mapped and "experts" in native:
        raise ConfigError("give the experts once: --experts role=path ..., or --face_network_weights and "
                          "--hand_network_weights")
    values.update({**mapped, **native})
    config = TrainConfig(stage=stage, **values)
    validate(config)
    if config.sample_every_n_steps and not config.sample_prompts:
        log.info("--sample_every_n_steps %d without --sample_prompts: nothing to sample (as in kohya)",
                 config.sample_every_n_steps)
    return config


def validate(c: TrainConfig) -> None:
    """Contradictions and missing inputs, found before any model is loaded. Changes nothing."""
    def need(name: str, why: str = "") -> None:
        if getattr(c, name) in (None, "", []):
            raise ConfigError(f"--{name} is required{why}")

    def exists(name: str) -> None:
        value = getattr(c, name)
        if value and not Path(value).exists():
            raise ConfigError(f"--{name} {value}: no such file or folder")

    from .stages import STAGES

    if c.stage not in STAGES:
        raise ConfigError(f"stage {c.stage!r} is not one of {tuple(STAGES)}")
    for name in ("pretrained_model_name_or_path", "output_dir", "output_name"):
        need(name)
    if bool(c.dataset_config) == bool(c.train_data_dir):
        raise ConfigError("give exactly one of --dataset_config and --train_data_dir")
    if c.in_json and not c.train_data_dir:
        raise ConfigError("--in_json goes with --train_data_dir (a dataset TOML names metadata_file per subset)")
    if c.conditioning_data_dir and not c.train_data_dir:
        raise ConfigError("--conditioning_data_dir goes with --train_data_dir (a dataset TOML names "
                          "conditioning_data_dir per subset)")
    if c.conditioning_data_dir and not c.loss_masked:
        raise ConfigError("--conditioning_data_dir holds loss masks here: give --masked_loss too")
    for name in ("pretrained_model_name_or_path", "dataset_config", "train_data_dir", "in_json", "resume",
                 "sample_prompts", "network_weights", "gate_weights", "conditioning_data_dir"):
        exists(name)
    _check_optimisation(c)
    _check_numbers(c)
    _check_device_options(c)
    if c.text_encoder_outputs_cached and c.train_text_encoder:
        raise ConfigError("--cache_text_encoder_outputs needs a frozen text encoder: a training one changes its "
                          "outputs every step (drop --train_text_encoder or the caching)")
    _check_stage(c)


def _check_optimisation(c: TrainConfig) -> None:
    """Steps, learning rates, schedules and the trained network's kohya options."""
    parse_resolution(c.resolution, "--resolution")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
        if getattr(c, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(c, name)}")
    if c.learning_rate <= 0 or c.max_grad_norm < 0 or c.lr_warmup_steps < 0:
        raise ConfigError("--learning_rate must be > 0, --max_grad_norm and --lr_warmup_steps >= 0")
    if c.lr_warmup_steps and c.lr_scheduler == "constant":
        raise ConfigError("--lr_warmup_steps needs a scheduler with warm-up (constant_with_warmup, cosine, "
                          "cosine_with_restarts, linear)")
    if c.lr_scheduler_num_cycles < 1 or (c.lr_scheduler_num_cycles > 1 and c.lr_scheduler != "cosine_with_restarts"):
        raise ConfigError(f"--lr_scheduler_num_cycles {c.lr_scheduler_num_cycles}: at least 1, and more than 1 only "
                          "with --lr_scheduler cosine_with_restarts")
    c.scheduler_kwargs()
    if c.zero_terminal_snr and not c.v_parameterization:
        raise ConfigError("--zero_terminal_snr needs --v_parameterization: at the last timestep the noisy latent is "
                          "pure noise, so predicting the noise there teaches nothing (kohya warns the same)")
    if c.network_dropout is not None and not 0 <= c.network_dropout < 1:
        raise ConfigError(f"--network_dropout must be in [0, 1), got {c.network_dropout}")
    if c.scale_weight_norms is not None and c.scale_weight_norms <= 0:
        raise ConfigError(f"--scale_weight_norms must be > 0 (1.0 is usual), got {c.scale_weight_norms}")
    if c.max_data_loader_n_workers is not None and c.max_data_loader_n_workers < 0:
        raise ConfigError(f"--max_data_loader_n_workers must be >= 0, got {c.max_data_loader_n_workers}")


def _check_numbers(c: TrainConfig) -> None:
    """Loss, noise, saving and sampling options: ranges and the options they need."""
    if not 0 < c.huber_c <= 1:
        raise ConfigError(f"--huber_c must be in (0, 1], got {c.huber_c}")
    if c.lr_warmup_steps >= c.max_train_steps:
        raise ConfigError("--lr_warmup_steps must be smaller than --max_train_steps")
    if not 0 <= c.caption_dropout_rate <= 1:
        raise ConfigError(f"--caption_dropout_rate must be from 0 to 1, got {c.caption_dropout_rate}")
    if c.min_snr_gamma is not None and c.min_snr_gamma <= 0:
        raise ConfigError("--min_snr_gamma must be > 0 (5 in the paper's stage 1)")
    if c.clip_skip is not None and not 1 <= c.clip_skip <= 12:
        raise ConfigError("--clip_skip must be between 1 and 12")
    if c.save_state and not (c.save_every_n_steps or c.save_every_n_epochs):
        raise ConfigError("--save_state saves with each --save_every_n_steps save: give --save_every_n_steps too")
    if c.save_every_n_steps is not None and c.save_every_n_steps < 1:
        raise ConfigError("--save_every_n_steps must be at least 1")
    if c.sample_prompts and not c.sample_every_n_steps:
        raise ConfigError("--sample_prompts needs --sample_every_n_steps (how often to sample them)")
    for name in ("max_train_epochs", "save_every_n_epochs", "multires_noise_iterations"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(c, name)}")
    if c.save_every_n_epochs and c.save_every_n_steps:
        raise ConfigError("give one of --save_every_n_steps and --save_every_n_epochs")
    if not 0 < c.multires_noise_discount <= 1 or (c.ip_noise_gamma is not None and not 0 <= c.ip_noise_gamma <= 1):
        raise ConfigError("--multires_noise_discount must be in (0, 1] and --ip_noise_gamma in [0, 1]")
    if c.noise_offset is not None and not 0 <= c.noise_offset <= 1:
        raise ConfigError(f"--noise_offset must be from 0 to 1 (0.05-0.1 is usual), got {c.noise_offset}")


def _check_stage(c: TrainConfig) -> None:
    """What one stage's options need."""
    if c.stage == "finetune":
        if c.save_precision != "float":
            raise ConfigError(f"--save_precision {c.save_precision}: train-base writes the full checkpoint as "
                              "ComfyUI holds the model; use it for train-expert and train-gates")
        if c.learning_rate_te is not None and not c.train_text_encoder:
            raise ConfigError("--learning_rate_te goes with --train_text_encoder")
        if c.learning_rate_te is not None and c.learning_rate_te <= 0:
            raise ConfigError("--learning_rate_te must be > 0")
    elif c.stage == "expert":
        if c.network_module != "networks.lora":
            raise ConfigError(f"--network_module {c.network_module}: only networks.lora (kohya LoRA) is supported")
        if c.network_dim < 1 or c.network_alpha <= 0:
            raise ConfigError("--network_dim must be >= 1 and --network_alpha > 0")
        check_role_name(c.expert_name)
    else:
        if not c.experts:
            raise ConfigError("--experts is required for train-gates (the frozen experts, role=path in column order)")
        for name, path in c.expert_paths().items():
            if not path.exists():
                raise ConfigError(f"--experts {name}={path}: no such file")


def _check_device_options(c: TrainConfig) -> None:
    import torch

    gpu = torch.cuda.is_available()
    if c.mixed_precision == "fp16" and not gpu:
        raise ConfigError("--mixed_precision fp16 needs a GPU; use bf16 (runs on the CPU) or no")
    if c.optimizer_type == "AdamW8bit" and not (gpu and importlib.util.find_spec("bitsandbytes")):
        raise ConfigError("--optimizer_type AdamW8bit needs bitsandbytes and a GPU; use AdamW or Lion")
    if c.optimizer_type == "Lion" and not importlib.util.find_spec("lion_pytorch"):
        raise ConfigError("--optimizer_type Lion needs lion-pytorch: pip install lion-pytorch")
    if c.torch_compile:
        import torch._dynamo

        available = torch._dynamo.list_backends(exclude_tags=())
        if c.dynamo_backend not in available:
            raise ConfigError(f"--dynamo_backend {c.dynamo_backend}: not a torch.compile backend of this PyTorch "
                              f"({torch.__version__}); it has {', '.join(sorted(available))}")
