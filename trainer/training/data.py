"""Training data in kohya's formats: dataset TOML, caption files, fine-tune metadata JSON/JSONL.

- Dataset TOML: `[general]` (defaults for everything below), `[[datasets]]` (resolution, batch_size, and subset
  defaults), `[[datasets.subsets]]` (image_dir, caption_extension, num_repeats, metadata_file, shuffle_caption,
  keep_tokens, flip_aug, random_crop, color_aug, ...). Unknown keys are errors.
- Captions: `<image stem><caption_extension>` next to the image, or a metadata file `{key: {"caption", "tags"}}`
  (JSON, or JSONL of `{"key"/"image": ..., "caption": ..., "tags": ...}` lines), keys with or without extension;
  caption and tags are joined with ", " as kohya does.
- Images: resized to cover the training size, then center-cropped (random_crop: cropped at a random place, drawn
  anew every step; color_aug: kohya's hue shift or gamma a third of the time). Unreadable or missing images are skipped,
  counted and reported, never fatal.
- Loss masks (--masked_loss, kohya's semantics): a mask image of the same file name in the subset's
  `conditioning_data_dir` (its red channel), or with `alpha_mask` the image's own alpha channel; white = learn,
  black = ignore, gray = partly. Cropped and flipped with their image; an image without one learns everywhere
  (the dataset summary counts both).
"""
from __future__ import annotations

import hashlib
import json
import math
import logging
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ...mole_ops import safetensors_io
from ...mole_ops.errors import MoLEError
from .buckets import BucketSettings, assign, bucket_sizes, summary
from .config import ConfigError, TrainConfig, parse_resolution, read_text

log = logging.getLogger("mole.trainer")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEYS = {"caption_prefix", "caption_suffix", "caption_separator", "keep_tokens_separator", "secondary_separator",
                "caption_tag_dropout_rate", "caption_dropout_every_n_epochs", "enable_wildcard", "token_warmup_min",
                "token_warmup_step", "class_tokens"}
SUBSET_KEYS = {"image_dir", "caption_extension", "num_repeats", "metadata_file", "shuffle_caption", "keep_tokens",
               "flip_aug", "conditioning_data_dir", "alpha_mask", "caption_dropout_rate", "random_crop",
               "color_aug"} | CAPTION_KEYS
SWITCHES = ("shuffle_caption", "flip_aug", "alpha_mask", "random_crop", "color_aug", "enable_wildcard")
TEXTS = ("caption_prefix", "caption_suffix", "caption_separator", "keep_tokens_separator", "secondary_separator",
         "class_tokens")
COUNTS = ("keep_tokens", "num_repeats", "caption_dropout_every_n_epochs", "token_warmup_min")
BUCKET_KEYS = {"enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"}
DATASET_KEYS = {"resolution", "batch_size"} | BUCKET_KEYS
# what each key does here (docs/kohya.md's dataset table); every key is kohya's, with kohya's meaning
KEY_HELP = {
    "resolution": "training size, S or [W, H]", "batch_size": "batch size of this dataset (per process)",
    "enable_bucket": "aspect-ratio bucketing", "min_bucket_reso": "smallest bucket side",
    "max_bucket_reso": "largest bucket side", "bucket_reso_steps": "bucket sides are multiples of this",
    "bucket_no_upscale": "never enlarge a picture for its bucket",
    "image_dir": "the subset's pictures (and, by default, their caption files)",
    "caption_extension": "caption files' extension", "num_repeats": "each picture counts this many times per epoch",
    "metadata_file": "kohya fine-tune metadata JSON/JSONL instead of caption files",
    "shuffle_caption": "shuffle the tags after the first keep_tokens every step",
    "keep_tokens": "tags kept in front when shuffling", "flip_aug": "mirror half of the pictures at random",
    "conditioning_data_dir": "loss masks named like the pictures (with --masked_loss)",
    "alpha_mask": "the pictures' alpha channel is their loss mask",
    "caption_dropout_rate": "train on an empty caption with this probability",
    "random_crop": "crop at a random place every step instead of the centre",
    "color_aug": "a hue shift or gamma a third of the time, every step",
    "caption_prefix": "put in front of every caption (with a space)",
    "caption_suffix": "put after every caption (with a space)",
    "caption_separator": "what separates tags (default ,)",
    "keep_tokens_separator": "tags before it stay in front, after a second one stay at the end",
    "secondary_separator": "replaced by caption_separator after shuffling (keeps groups of tags together)",
    "caption_tag_dropout_rate": "drop each shuffled tag with this probability",
    "caption_dropout_every_n_epochs": "every N-th epoch trains on empty captions",
    "enable_wildcard": "a random line of a multi-line caption, and {a|b} choices drawn every step",
    "token_warmup_min": "tags at the start of the token warm-up",
    "token_warmup_step": "steps (below 1: share of the run) over which the tags grow to all of them",
    "class_tokens": "the caption of pictures without a caption file (DreamBooth subsets)",
}


@dataclass(frozen=True)
class Subset:
    image_dir: str
    caption_extension: str = ".caption"
    num_repeats: int = 1
    metadata_file: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False
    conditioning_data_dir: str | None = None
    alpha_mask: bool = False
    caption_dropout_rate: float = 0.0
    random_crop: bool = False
    color_aug: bool = False
    # kohya's caption keys (process_caption)
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_separator: str = ","
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    class_tokens: str | None = None

    @property
    def captions_vary(self) -> str | None:
        """The key that makes a caption differ from step to step (beyond dropping it), or None."""
        for key in ("shuffle_caption", "caption_tag_dropout_rate", "enable_wildcard", "token_warmup_step"):
            if getattr(self, key):
                return key
        return None


class Picture(NamedTuple):
    """One training picture as a step sees it: the file, mirrored or not, where it is cropped ((x, y) fractions
    of the slack; None = the centre) and its colour change (("hue", shift of 180) or ("gamma", g); None)."""

    path: Path
    flip: bool = False
    crop: tuple[float, float] | None = None
    color: tuple[str, float] | None = None


@dataclass
class Dataset:
    resolution: tuple[int, int]
    batch_size: int
    subsets: list[Subset]
    items: list[tuple[Path, str, Subset]] = field(default_factory=list)   # (image, caption, its subset)
    skipped: list[str] = field(default_factory=list)
    buckets: BucketSettings | None = None
    sizes: list[tuple[int, int]] = field(default_factory=list)            # per item, when bucketing
    masks: dict[Path, tuple[Path, bool] | None] = field(default_factory=dict)   # image -> mask, with --masked_loss

    def size_of(self, index: int) -> tuple[int, int]:
        return self.sizes[index] if self.sizes else self.resolution


def _take(table: dict, allowed: set[str], where: str) -> dict:
    """The keys of `table` that are ours; kohya's other keys print their line (no effect here) or stop with their
    reason (kohya.DATASET_KEYS); anything else is an unknown key."""
    from .kohya import dataset_key

    if not isinstance(table, dict):
        raise ConfigError(f"{where}: should be a table of keys ([[datasets]] with [[datasets.subsets]] under it), "
                          f"not {type(table).__name__} {table!r}"[:300])
    table = dict(table)
    for key in sorted(set(table) - allowed):
        if dataset_key(key, table[key], where):
            del table[key]
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; supported: {sorted(allowed)}")
    return table


def load_dataset_toml(path: Path, config: TrainConfig) -> list[Dataset]:
    try:
        doc = tomllib.loads(read_text(path, "dataset config"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"dataset config {path}: {e}") from e
    _take(doc, {"general", "datasets"}, str(path))
    general = _take(doc.get("general", {}), (SUBSET_KEYS | DATASET_KEYS) - {"image_dir", "metadata_file"},
                    f"{path} [general]")
    if not doc.get("datasets"):
        raise ConfigError(f"{path}: no [[datasets]]")
    datasets = []
    for i, table in enumerate(doc["datasets"]):
        where = f"{path} [[datasets]] #{i + 1}"
        table = _take(table, SUBSET_KEYS | DATASET_KEYS | {"subsets"}, where)
        settings = {**general, **{k: v for k, v in table.items() if k != "subsets"}}
        resolution = parse_resolution(",".join(map(str, settings["resolution"])) if isinstance(
            settings.get("resolution"), list) else settings.get("resolution", config.resolution), where)
        batch = int(settings.get("batch_size", config.train_batch_size))
        buckets = _bucket_settings({k: settings.get(k, getattr(config, k)) for k in BUCKET_KEYS}, resolution)
        subset_defaults = {"caption_dropout_rate": config.caption_dropout_rate, "random_crop": config.random_crop,
                           "color_aug": config.color_aug, **{k: v for k, v in settings.items() if k in SUBSET_KEYS}}
        subsets = []
        for j, sub in enumerate(table.get("subsets") or []):
            sub = {**subset_defaults, **_take(sub, SUBSET_KEYS, f"{where} [[datasets.subsets]] #{j + 1}")}
            if "image_dir" not in sub:
                raise ConfigError(f"{where} subset #{j + 1}: image_dir is required")
            folders = {key: str(_relative(path, sub[key])) for key in ("metadata_file", "conditioning_data_dir")
                       if sub.get(key)}
            _check_dropout(sub["caption_dropout_rate"], f"{where} subset #{j + 1}")
            _check_types(sub, f"{where} subset #{j + 1}")
            subsets.append(Subset(**{**sub, "image_dir": str(_relative(path, sub["image_dir"])), **folders}))
        if not subsets:
            raise ConfigError(f"{where}: no [[datasets.subsets]]")
        datasets.append(Dataset(resolution, batch, subsets, buckets=buckets))
    return datasets


def _relative(toml_path: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (Path(toml_path).parent / p)


def datasets_from_config(config: TrainConfig) -> list[Dataset]:
    if config.dataset_config:
        datasets = load_dataset_toml(Path(config.dataset_config), config)
    else:
        subset = Subset(config.train_data_dir, config.caption_extension, metadata_file=config.in_json,
                        conditioning_data_dir=config.conditioning_data_dir, alpha_mask=config.alpha_mask,
                        caption_dropout_rate=config.caption_dropout_rate, random_crop=config.random_crop,
                        color_aug=config.color_aug)
        buckets = _bucket_settings({k: getattr(config, k) for k in BUCKET_KEYS}, config.size)
        datasets = [Dataset(config.size, config.train_batch_size, [subset], buckets=buckets)]
    for d in datasets:
        for s in d.subsets:
            found, skipped = scan_subset(s)
            d.items += found
            d.skipped += skipped
        if d.skipped:
            log.warning("skipped %d image(s) (unreadable, missing or without caption); first: %s",
                        len(d.skipped), d.skipped[0])
        if d.buckets is not None and d.items:
            sizes = bucket_sizes(d.buckets)
            d.sizes = [assign(_image_size(path), sizes, d.buckets) for path, _, _ in d.items]
            log.info("dataset at %dx%d: %s", *d.resolution, summary(d.sizes))
    if not any(d.items for d in datasets):
        raise ConfigError("no usable training images were found (see the skipped images above)")
    changing = [(s.image_dir, k) for d in datasets for s in d.subsets for k in ("random_crop", "color_aug")
                if getattr(s, k)]
    if config.latents_cached and changing:
        raise ConfigError(f"--cache_latents: {changing[0][1]} (subset {changing[0][0]}) makes a new picture every "
                          "step, so its latent cannot be encoded once; drop one of them (as in kohya)")
    if config.loss_masked:
        for d in datasets:
            d.masks = {path: mask_source(path, s) for path, _, s in d.items}
        found = {path: m for d in datasets for path, m in d.masks.items()}
        masked = sum(m is not None for m in found.values())
        log.info("masked loss: %d image(s) with a mask, %d without (those learn everywhere)", masked,
                 len(found) - masked)
        if not masked:
            raise ConfigError("--masked_loss: no image has a mask (give each subset conditioning_data_dir with mask "
                              "images named like the training images, or alpha_mask for images with an alpha "
                              "channel)")
    elif any(s.alpha_mask or s.conditioning_data_dir for d in datasets for s in d.subsets):
        log.warning("a subset names loss masks (alpha_mask or conditioning_data_dir) but --masked_loss is off: "
                    "the masks are not used")
    return datasets


def _bucket_settings(values: dict, resolution: tuple[int, int]) -> BucketSettings | None:
    if not values["enable_bucket"]:
        return None
    return BucketSettings(resolution, int(values["min_bucket_reso"]), int(values["max_bucket_reso"]),
                          int(values["bucket_reso_steps"]), bool(values["bucket_no_upscale"]))


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def read_metadata(path: Path) -> dict[str, str]:
    """kohya fine-tune metadata -> {key without extension: caption}."""
    text = read_text(path, "metadata file")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            if not all(isinstance(r, dict) for r in rows):
                raise ConfigError(f"metadata file {path}: every line must be an object {{key, caption, tags}}")
            entries = {r.get("key") or r.get("image") or r.get("file_name"): r for r in rows}
        else:
            entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"metadata file {path}: not valid JSON ({e})") from e
    if not isinstance(entries, dict):
        raise ConfigError(f"metadata file {path}: expected an object {{key: {{caption, tags}}}}")
    out = {}
    for key, entry in entries.items():
        if not key or not isinstance(key, str) or not isinstance(entry, dict):
            raise ConfigError(f"metadata file {path}: entry {key!r} is not an object with caption/tags")
        parts = [entry.get("caption") or "", entry.get("tags") or ""]
        if not all(isinstance(p, str) for p in parts):
            raise ConfigError(f"metadata file {path}: entry {key!r}: caption and tags must be text, got "
                              f"{[type(p).__name__ for p in parts]}")
        out[Path(key).stem if Path(key).suffix.lower() in IMAGE_EXTENSIONS else key] = ", ".join(
            p.strip() for p in parts if p and p.strip())
    return out


def scan_subset(subset: Subset) -> tuple[list, list[str]]:
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        raise ConfigError(f"image_dir {folder}: no such folder")
    meta = read_metadata(Path(subset.metadata_file)) if subset.metadata_file else None
    found, skipped = [], []
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    keys = {p.stem for p in images}
    if meta is not None:
        skipped += [f"{folder / k} (in the metadata, no image)" for k in sorted(set(meta) - keys)]
    for image in images:
        if meta is not None:
            caption = meta.get(image.stem)
        else:
            caption_file = image.with_suffix(subset.caption_extension)
            caption = read_text(caption_file, "caption file").strip() if caption_file.exists() else None
        if caption is None and subset.class_tokens:       # kohya's DreamBooth subsets: the class as the caption
            caption = subset.class_tokens
        if caption is None:
            skipped.append(f"{image} (no caption)")
            continue
        if not readable(image):
            skipped.append(f"{image} (unreadable)")
            continue
        found += [(image, caption, subset)] * subset.num_repeats
    return found, skipped


def readable(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False


def _decoded(path: Path, what: str, convert):
    """convert(the opened PIL image), or ConfigError naming the file: PIL's decoders raise many types (OSError for
    truncated data, SyntaxError, ValueError, DecompressionBombError, ...), none of them the user's fault to read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return convert(im)
    except MoLEError:
        raise
    except Exception as e:  # noqa: BLE001  (see above)
        raise ConfigError(f"{what} {path}: cannot be read as an image ({type(e).__name__}: {e}); re-save it as "
                          "PNG or JPEG, or remove it") from e


def load_image(path: Path, size: tuple[int, int], flip: bool = False, crop: tuple[float, float] | None = None,
               color: tuple[str, float] | None = None) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] (ComfyUI's IMAGE layout): resized to cover `size` (W, H), cropped (centre, or at
    `crop`), mirrored with `flip`, colour-changed with `color` (see Picture)."""
    def convert(im):
        pixels = np.asarray(_fit(im.convert("RGB"), size, flip, crop))
        return torch.from_numpy(recolor(pixels, color).astype(np.float32) / 255.0)

    return _decoded(path, "image", convert)


def _fit(im, size: tuple[int, int], flip: bool, crop: tuple[float, float] | None = None):
    """A PIL image resized to cover `size` (W, H), cropped (at the centre, or at `crop`: fractions of the slack, as
    kohya's random_crop draws an offset in [0, slack]), optionally mirrored."""
    from PIL import Image

    width, height = size
    scale = max(width / im.width, height / im.height)
    w, h = max(width, round(im.width * scale)), max(height, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.LANCZOS)
    if crop is None:
        left, top = (w - width) // 2, (h - height) // 2
    else:
        left, top = round(crop[0] * (w - width)), round(crop[1] * (h - height))
    im = im.crop((left, top, left + width, top + height))
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im


def draw_color(gen: torch.Generator) -> tuple[str, float] | None:
    """kohya's color_aug draw: a third of the time, half of those a hue shift in [-8, 8] (of 180, OpenCV's hue
    scale), half a gamma in [0.95, 1.05]."""
    u = torch.rand(3, generator=gen).tolist()
    if u[0] > 0.33:
        return None
    return ("hue", 16 * u[2] - 8) if u[1] > 0.5 else ("gamma", 0.95 + 0.1 * u[2])


def recolor(pixels: np.ndarray, color: tuple[str, float] | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB with kohya's colour change: hue rotated by shift/180 of a turn (saturation and value
    kept), or every value v raised to v ** gamma on the 0-255 scale and clipped (kohya's gamma, as it computes it)."""
    if color is None:
        return pixels
    kind, value = color
    if kind == "gamma":
        return np.clip(pixels.astype(np.float64) ** value, 0, 255).astype(np.uint8)
    from PIL import Image

    hsv = np.asarray(Image.fromarray(pixels).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(value * 256 / 180)) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def mask_source(image: Path, subset: Subset) -> tuple[Path, bool] | None:
    """(file, is alpha) of an image's loss mask, or None: a same-named image in conditioning_data_dir (any image
    extension), else with alpha_mask the image itself when it has an alpha channel."""
    if subset.conditioning_data_dir:
        folder = Path(subset.conditioning_data_dir)
        for ext in (image.suffix, *IMAGE_EXTENSIONS):
            if (folder / f"{image.stem}{ext}").is_file():
                return folder / f"{image.stem}{ext}", False
    if subset.alpha_mask and _has_alpha(image):
        return image, True
    return None


def _has_alpha(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return "A" in im.getbands() or "transparency" in im.info


def load_mask(path: Path, alpha: bool, size: tuple[int, int], flip: bool = False,
              crop: tuple[float, float] | None = None) -> torch.Tensor:
    """(H, W) loss weights in [0, 1]: the mask file's red channel or the image's alpha, cropped and flipped exactly
    as load_image crops and flips the image."""
    def convert(im):
        channel = im.convert("RGBA").getchannel("A") if alpha else im.convert("RGB").getchannel("R")
        return torch.from_numpy(np.asarray(_fit(channel, size, flip, crop)).astype(np.float32) / 255.0)

    return _decoded(path, "mask", convert)


def _check_types(sub: dict, where: str) -> None:
    """The types of a subset's keys, as kohya's schema has them."""
    def fail(key: str, what: str):
        raise ConfigError(f"{where}: {key} = {sub[key]!r} should be {what}")

    for key in SWITCHES:
        if key in sub and not isinstance(sub[key], bool):
            fail(key, "true or false")
    for key in TEXTS:
        if key in sub and not isinstance(sub[key], str):
            fail(key, "a string")
    for key in COUNTS:
        if key in sub and (isinstance(sub[key], bool) or not isinstance(sub[key], int) or sub[key] < 0):
            fail(key, "a whole number >= 0")
    if sub.get("caption_separator", ",") == "":
        fail("caption_separator", "a non-empty string")
    rate = sub.get("caption_tag_dropout_rate", 0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        fail("caption_tag_dropout_rate", "a number from 0 to 1")
    warmup = sub.get("token_warmup_step", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
        fail("token_warmup_step", "a number >= 0 (below 1: a share of --max_train_steps)")


def _check_dropout(rate, where: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise ConfigError(f"{where}: caption_dropout_rate = {rate!r} should be a number from 0 to 1")


def process_caption(caption: str, subset: Subset, gen: torch.Generator, epoch: int = 1, step: int = 0,
                    total_steps: int = 1) -> str:
    """A caption as a training step sees it, in kohya's order: caption_prefix / caption_suffix (joined with a
    space); the caption dropped (empty: the unconditional prediction classifier-free guidance needs) with
    caption_dropout_rate, or in every caption_dropout_every_n_epochs-th epoch (epochs count from 1); one line (the
    first, or with enable_wildcard a random one, whose {a|b|c} choices are drawn; {{ and }} are literal braces);
    then, with shuffle_caption, caption_tag_dropout_rate or token_warmup_step, the tags (split at
    caption_separator) after the first keep_tokens (or before a keep_tokens_separator, and after a second one) are
    cut to the warm-up length, shuffled and dropped one by one, and joined with ", "; finally secondary_separator
    becomes caption_separator. Draws from `gen` only where a subset asks for a random change."""
    if subset.caption_prefix:
        caption = f"{subset.caption_prefix} {caption}"
    if subset.caption_suffix:
        caption = f"{caption} {subset.caption_suffix}"
    if subset.caption_dropout_rate and torch.rand((), generator=gen).item() < subset.caption_dropout_rate:
        return ""
    if subset.caption_dropout_every_n_epochs and epoch % subset.caption_dropout_every_n_epochs == 0:
        return ""
    if subset.enable_wildcard:
        lines = caption.split("\n")
        caption = lines[int(torch.randint(len(lines), (), generator=gen))] if len(lines) > 1 else caption
        caption = _wildcards(caption, gen)
    else:
        caption = caption.split("\n")[0]
    if subset.shuffle_caption or subset.caption_tag_dropout_rate or subset.token_warmup_step:
        caption = _tags(caption, subset, gen, step, total_steps)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def _wildcards(caption: str, gen: torch.Generator) -> str:
    """kohya's {a|b|c}: one choice each, drawn from `gen`; {{ and }} stay as literal braces."""
    import re

    def choose(match) -> str:
        options = match.group(1).split("|")
        return options[int(torch.randint(len(options), (), generator=gen))]

    open_mark, close_mark = "\x00", "\x01"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", choose, caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _tags(caption: str, subset: Subset, gen: torch.Generator, step: int, total_steps: int) -> str:
    sep, split = subset.caption_separator, subset.keep_tokens_separator
    fixed, suffix = [], []
    if split and split in caption:
        fixed_part, flex_part = caption.split(split, 1)
        if split in flex_part:
            flex_part, suffix_part = flex_part.split(split, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
    else:
        tags = [t.strip() for t in caption.strip().split(sep)]
        fixed, flex = tags[:subset.keep_tokens], tags[subset.keep_tokens:]
    warmup = subset.token_warmup_step
    warmup = math.floor(warmup * total_steps) if 0 < warmup < 1 else int(warmup)
    if warmup and step < warmup:
        flex = flex[:math.floor(step * (len(flex) - subset.token_warmup_min) / warmup) + subset.token_warmup_min]
    if subset.shuffle_caption:
        order = torch.randperm(len(flex), generator=gen).tolist()
        flex = [flex[i] for i in order]
    if subset.caption_tag_dropout_rate:
        keep = (torch.rand(len(flex), generator=gen) >= subset.caption_tag_dropout_rate).tolist()
        flex = [t for t, k in zip(flex, keep) if k]
    return ", ".join(fixed + flex + suffix)


def image_key(path: Path, size: tuple[int, int], flip: bool, vae_id: str) -> str:
    """Cache key of a latent: image bytes, crop size, flip and the VAE, so any change invalidates it."""
    digest = hashlib.sha256(Path(path).read_bytes())
    digest.update(f"{size}|{flip}|{vae_id}".encode())
    return digest.hexdigest()[:32]


class LatentCache:
    """Latents by cache key, in memory and optionally in a folder (one safetensors per latent, atomic writes)."""

    def __init__(self, folder: Path | None = None):
        self.memory: dict[str, torch.Tensor] = {}
        self.folder = Path(folder) if folder else None
        self.hits = self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        if self.folder is not None and (self.folder / f"{key}.safetensors").exists():
            try:
                tensors, _, _ = safetensors_io.read(self.folder / f"{key}.safetensors")
            except MoLEError:
                return None                      # a damaged cache entry is re-encoded, never fatal
            self.memory[key] = tensors["latent"]
            self.hits += 1
            return self.memory[key]
        self.misses += 1
        return None

    def put(self, key: str, latent: torch.Tensor) -> None:
        self.memory[key] = latent
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            safetensors_io.write(self.folder / f"{key}.safetensors", {"latent": latent.contiguous()}, {})



@dataclass
class Batch:
    images: list[Picture]
    captions: list[str]
    size: tuple[int, int]
    masks: list[tuple[Path, bool] | None] = field(default_factory=list)   # (mask file, is alpha) per image, or []

    def rows(self, rows: list[int]) -> "Batch":
        """The batch of these rows only."""
        return Batch([self.images[i] for i in rows], [self.captions[i] for i in rows], self.size,
                     [self.masks[i] for i in rows] if self.masks else [])


class BatchPlan:
    """The order of global batches: per epoch, each dataset's items shuffled into its own batches (within one
    bucket), then all batches of all datasets shuffled together, from the training generator (so it resumes
    exactly). A global batch holds batch_size x processes images (kohya: the batch size is per process)."""

    def __init__(self, datasets: list[Dataset], processes: int = 1):
        self.datasets = [d for d in datasets if d.items]
        self.processes = processes

    def epoch(self, gen: torch.Generator) -> list[tuple[int, list[int]]]:
        batches = []
        for di, d in enumerate(self.datasets):
            order = torch.randperm(len(d.items), generator=gen).tolist()
            groups: dict[tuple[int, int], list[int]] = {}
            for i in order:                                 # one group per bucket (one group without bucketing)
                groups.setdefault(d.size_of(i), []).append(i)
            size = d.batch_size * self.processes
            for members in groups.values():
                batches += [(di, members[i:i + size]) for i in range(0, len(members), size)]
        shuffle = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in shuffle]

    def make(self, entry: tuple[int, list[int]], gen: torch.Generator, epoch: int = 1, step: int = 0,
             total_steps: int = 1) -> Batch:
        """The batch of `entry`, its random changes drawn from `gen`; `epoch` (from 1), `step` (optimizer steps
        done) and `total_steps` for the captions' epoch- and step-dependent keys."""
        di, indices = entry
        d = self.datasets[di]
        images, captions = [], []
        for i in indices:
            path, caption, subset = d.items[i]
            flip = bool(subset.flip_aug and torch.rand((), generator=gen).item() < 0.5)
            # each augmentation draws only when on, so runs without it stay bitwise alike
            crop = tuple(torch.rand(2, generator=gen).tolist()) if subset.random_crop else None
            color = draw_color(gen) if subset.color_aug else None
            images.append(Picture(path, flip, crop, color))
            captions.append(process_caption(caption, subset, gen, epoch, step, total_steps))
        masks = [d.masks.get(p.path) for p in images] if d.masks else []
        return Batch(images, captions, d.size_of(indices[0]), masks)

    def __len__(self) -> int:
        total = 0
        for d in self.datasets:
            counts = Counter(d.size_of(i) for i in range(len(d.items)))
            total += sum(-(-n // (d.batch_size * self.processes)) for n in counts.values())
        return total

