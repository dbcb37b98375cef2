"""kohya sd-scripts flags that are not options of TrainConfig under the same name: each is an alias of ours
(implemented), accepted with no effect here (one printed line says why), or refused with the reason. A kohya user's
command (and `--config_file` TOML) then either runs or stops with a message that names the flag; argparse's bare
"unrecognized arguments" is left for typos. The parser (config.add_arguments / from_args), `--help`'s groups and
the compatibility table in docs/kohya.md (`python -m trainer kohya-table`) all come from REGISTRY.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mole.train")

IMPLEMENTED, NO_OP, REFUSED = "implemented", "accepted, no effect here", "refused"
ALL_STAGES = ("finetune", "expert", "gates")


@dataclass(frozen=True)
class Flag:
    """One kohya flag. `switch`: takes no value. `accept(value)`: for a flag that is fine with some values only
    (no effect) and refused with others. `to(value, stage)`: for an alias, our options it sets."""

    name: str
    kind: str
    meaning: str
    switch: bool = False
    stages: tuple[str, ...] = ALL_STAGES
    accept: Callable[[str], bool] | None = None
    to: Callable[[object, str], dict] | None = None


def _float_is(x: float) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        try:
            return float(value) == x
        except ValueError:
            return False
    return check


def _one_of(*values: str) -> Callable[[str], bool]:
    return lambda value: str(value).lower() in values


def _experts(role: str) -> Callable[[object, str], dict]:
    return lambda value, stage: {"experts": [f"{role}={value}"]}


ATTENTION = "ComfyUI picks its own attention back-end (xformers, SDPA or split) for the loaded model"
REGISTRY: tuple[Flag, ...] = (
    # -- aliases: kohya's name for an option of ours ------------------------------------------------------------
    Flag("use_lion_optimizer", IMPLEMENTED, "--optimizer_type Lion (lion-pytorch)", switch=True,
         to=lambda v, s: {"optimizer_type": "Lion"}),
    Flag("unet_lr", IMPLEMENTED, "the UNet's learning rate: --learning_rate (every weight trained here is in or "
         "beside the UNet)", to=lambda v, s: {"learning_rate": float(v)}),
    Flag("text_encoder_lr", IMPLEMENTED, "train-base: --learning_rate_te; train-expert and train-gates train no "
         "text encoder, so it has no effect there", to=lambda v, s: {"learning_rate_te": float(v)}
         if s == "finetune" else {}),
    Flag("face_network_weights", IMPLEMENTED, "train-gates (the authors' train_moe.py): the face expert, as "
         "--experts face=FILE", stages=("gates",), to=_experts("face")),
    Flag("hand_network_weights", IMPLEMENTED, "train-gates (the authors' train_moe.py): the hand expert, as "
         "--experts hand=FILE", stages=("gates",), to=_experts("hand")),
    # -- no effect here -----------------------------------------------------------------------------------------
    Flag("xformers", NO_OP, ATTENTION, switch=True),
    Flag("sdpa", NO_OP, ATTENTION, switch=True),
    Flag("mem_eff_attn", NO_OP, ATTENTION, switch=True),
    Flag("diffusers_xformers", NO_OP, ATTENTION, switch=True),
    Flag("network_train_unet_only", NO_OP, "experts are UNet-only LoRAs already (and stage 3 trains only gates)",
         switch=True, stages=("expert", "gates")),
    Flag("network_module_lora", NO_OP, "the experts are kohya LoRAs (networks.lora) and are read as such",
         stages=("gates",), accept=_one_of("networks.lora")),
    Flag("network_module_moe", NO_OP, "the gates are this pack's (the authors' networks.moe layout)",
         stages=("gates",), accept=_one_of("networks.moe")),
    Flag("network_dim_face", NO_OP, "the face expert's rank is read from its file", stages=("gates",)),
    Flag("network_dim_hand", NO_OP, "the hand expert's rank is read from its file", stages=("gates",)),
    Flag("network_alpha_face", NO_OP, "the face expert's alpha is read from its file", stages=("gates",)),
    Flag("network_alpha_hand", NO_OP, "the hand expert's alpha is read from its file", stages=("gates",)),
    Flag("save_model_as", NO_OP, "files are always .safetensors; ckpt and pt (pickles) and diffusers folders are "
         "not written", accept=_one_of("safetensors")),
    Flag("persistent_data_loader_workers", NO_OP, "the reading threads of --max_data_loader_n_workers live for "
         "the whole run already", switch=True),
    Flag("logging_dir", NO_OP, "the run's log (a CSV row per step) and its loss curve go to --output_dir"),
    Flag("log_with", NO_OP, "the run's log is a CSV and a loss-curve PNG in --output_dir; no TensorBoard or "
         "wandb"),
    Flag("sample_sampler", NO_OP, "samples use ComfyUI's euler sampler, normal schedule"),
    Flag("max_token_length", NO_OP, "captions are cut at 75 tokens, as in the authors' recipe; 150 and 225 are "
         "refused", accept=_one_of("75")),
    Flag("prior_loss_weight", NO_OP, "there are no regularisation images here, so a weight of 1 changes nothing; "
         "other weights are refused", accept=_float_is(1.0)),
    # -- refused ------------------------------------------------------------------------------------------------
    Flag("full_fp16", REFUSED, "weights train in float32; use --mixed_precision bf16 for half-precision compute",
         switch=True),
    Flag("full_bf16", REFUSED, "weights train in float32; use --mixed_precision bf16 for half-precision compute",
         switch=True),
    Flag("network_args", REFUSED, "LyCORIS and LoCon arguments (conv_dim, algo, ...), block-wise ranks and learning "
         "rates, rank and module dropout: the experts are plain kohya LoRAs on the layers MoLE gates (SPEC.md); "
         "--network_dropout is supported"),
    Flag("dim_from_weights", NO_OP, "a --network_weights file always keeps its own rank and alpha",
         switch=True, stages=("expert",)),
)
BY_NAME = {f.name: f for f in REGISTRY}

# kohya's dataset TOML keys (library/config_util.py's schema) that are not keys of ours (data.SUBSET_KEYS,
# data.DATASET_KEYS): what each does here
DATASET_KEYS: tuple[Flag, ...] = (
    Flag("cache_info", NO_OP, "picture sizes are read quickly at the start of every run; no cache file"),
    Flag("resize_interpolation", NO_OP, "pictures are resized with Lanczos here; other filters are refused",
         accept=_one_of("lanczos")),
    Flag("network_multiplier", NO_OP, "every dataset trains the network at multiplier 1; other values are refused",
         accept=_float_is(1.0)),
    Flag("face_crop_aug_range", REFUSED, "face-centred crops need face boxes in the file names; use random_crop, or "
         "`python -m trainer prepare` for face and hand close-ups"),
    Flag("is_reg", REFUSED, "regularisation (prior-preservation) subsets are not supported"),
    Flag("validation_split", REFUSED, "no validation split while training; measure held-out pictures with "
         "`python -m trainer evaluate`"),
    Flag("validation_seed", REFUSED, "no validation split while training (see validation_split)"),
    Flag("custom_attributes", REFUSED, "kohya passes these to other architectures' models; SD1.5 and SDXL take none"),
)
DATASET_BY_NAME = {f.name: f for f in DATASET_KEYS}


def dataset_key(name: str, value, where: str) -> bool:
    """A kohya dataset key that is not ours: True after one printed line (no effect here); ConfigError with the
    reason (refused, or a value other than the one that changes nothing); False for a key kohya does not have."""
    from .config import ConfigError

    f = DATASET_BY_NAME.get(name)
    if f is None:
        return False
    if f.kind == REFUSED or (f.accept is not None and not f.accept(str(value))):
        raise ConfigError(f"{where}: {name} = {value!r}: not supported: {f.meaning}")
    if value is not False:
        log.info("%s: %s = %r: no effect here (%s)", where, name, value, f.meaning)
    return True


def add_flags(parser, stage: str) -> None:
    """The registry's flags of `stage`, in three --help groups."""
    import argparse

    groups = {kind: parser.add_argument_group(f"kohya flags: {kind}") for kind in (IMPLEMENTED, NO_OP, REFUSED)}
    for f in REGISTRY:
        ours = stage in f.stages           # another stage's flag is refused by name (resolve), not by argparse
        kwargs = {"help": f.meaning if ours else f"{_stages(f.stages)} only", "default": argparse.SUPPRESS}
        if f.switch:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = "VALUE"
        groups[f.kind if ours else REFUSED].add_argument(f"--{f.name}", **kwargs)


def resolve(given: dict[str, object], stage: str, where: str = "") -> dict:
    """Our options for the registry's flags in `given` ({name: value}, from the command line or a TOML file);
    prints one line per flag without effect, raises ConfigError for a refused one. `where`: the TOML file."""
    from .config import ConfigError

    out: dict = {}
    for name, value in given.items():
        f = BY_NAME[name]
        if f.switch and value is False:          # `xformers = false` in a TOML file: not given
            continue
        flag = f"{where}: {name}" if where else f"--{name}"
        shown = "" if f.switch else f" {value}"
        if stage not in f.stages:
            raise ConfigError(f"{flag}{shown}: a kohya flag of {', '.join('train-' + s for s in f.stages)}, "
                              f"not of this stage")
        if f.kind == REFUSED or (f.accept is not None and not f.accept(str(value))):
            raise ConfigError(f"{flag}{shown}: not supported: {f.meaning}")
        if f.kind == NO_OP:
            log.info("%s%s: no effect here (%s)", flag, shown, f.meaning)
            continue
        try:
            mapped = f.to(value, stage)
        except ValueError as e:
            raise ConfigError(f"{flag}{shown}: {e}") from e
        for key, v in mapped.items():                # --experts from face_ and hand_network_weights add up
            out[key] = out.get(key, []) + v if isinstance(v, list) else v
        if not mapped:
            log.info("%s%s: no effect in this stage (%s)", flag, shown, f.meaning)
    return out


def _stages(stages) -> str:
    return ", ".join("train-" + {"finetune": "base"}.get(s, s) for s in (stages or ALL_STAGES))


def table(native: dict[str, tuple[str, tuple | None]]) -> str:
    """docs/kohya.md: every flag the trainer accepts, by class. `native`: {name: (help, stages)} of TrainConfig's
    options (kohya's names where the meaning matches; "[MoLE]" in the help marks this pack's own)."""
    own = sum(h.startswith("[MoLE]") for h, _ in native.values())
    lines = ["# kohya sd-scripts flags in ComfyUI-MoLE's trainer", "",
             "Written by `python -m trainer kohya-table` from the registry the parser uses "
             "(`trainer/training/kohya.py`, `trainer/training/config.py`); a test keeps it current.", "",
             f"Counts: {len(native) - own} kohya options implemented under their own names, {own} options of "
             "MoLE's own, and kohya flags under other names: "
             + ", ".join(f"{sum(f.kind == k for f in REGISTRY)} {k}" for k in (IMPLEMENTED, NO_OP, REFUSED))
             + ". A refused flag stops the run with its reason; a flag accepted with no effect prints one line.",
             "",
             "| flag | class | stages | meaning here |", "|---|---|---|---|"]
    for name, (help_text, stages) in native.items():
        kind = "MoLE's own" if help_text.startswith("[MoLE]") else IMPLEMENTED
        lines.append(f"| `--{name}` | {kind} | {_stages(stages)} | {help_text.replace('|', '/')} |")
    for f in REGISTRY:
        lines.append(f"| `--{f.name}` | {f.kind} | {_stages(f.stages)} | {f.meaning.replace('|', '/')} |")
    from .data import DATASET_KEYS as OURS, KEY_HELP, SUBSET_KEYS

    lines += ["", "## Dataset TOML keys", "",
              f"kohya's keys of `[general]`, `[[datasets]]` and `[[datasets.subsets]]` (its `config_util.py` schema, "
              f"for the image datasets these stages use): {len(OURS | SUBSET_KEYS)} implemented, "
              + ", ".join(f"{sum(f.kind == k for f in DATASET_KEYS)} {k}" for k in (NO_OP, REFUSED))
              + ". A subset key may also be given for a whole dataset or in `[general]`, as in kohya; any other key "
              "is an error that lists the supported ones.", "",
              "| key | class | where | meaning here |", "|---|---|---|---|"]
    for key in sorted(OURS) + sorted(SUBSET_KEYS):
        where = "dataset, general" if key in OURS else \
            "subset, dataset" if key in ("image_dir", "metadata_file") else "subset, dataset, general"
        lines.append(f"| `{key}` | {IMPLEMENTED} | {where} | {KEY_HELP[key].replace('|', '/')} |")
    for f in DATASET_KEYS:
        lines.append(f"| `{f.name}` | {f.kind} | any | {f.meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


DOC = Path(__file__).resolve().parents[2] / "docs" / "kohya.md"


def native_options() -> dict[str, str]:
    from .config import _fields

    return {name: (f.metadata["help"], f.metadata["stages"]) for name, f in _fields().items()}


def add_arguments(parser) -> None:
    """`python -m trainer kohya-table`."""
    parser.add_argument("--output", type=Path, default=DOC, help="where to write the table")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ...mole_ops.atomic import write_text

    write_text(args.output, table(native_options()))
    log.info("wrote %s", args.output)
    return 0
