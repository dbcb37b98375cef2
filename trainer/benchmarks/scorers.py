"""The image scorers of `python -m trainer evaluate`, all from the user's local weights (nothing is downloaded):

- HPS v2 / v2.1: open_clip's ViT-H-14 with the official HPS checkpoint (HPS_v2_compressed.pt or
  HPS_v2.1_compressed.pt, {"state_dict": ...} in open_clip's key layout, loaded strictly). Score = 100 x the cosine
  of the image and prompt features, as hpsv2's benchmark computes it; the image goes through hpsv2's validation
  transform (to tensor, bicubic resize of the short side to 224, centre crop, CLIP normalisation).
- ImageReward: the image-reward package's own model code, run in its own environment (scripts/imagereward-env.sh;
  its pins, timm 0.6 and transformers 4, clash with ComfyUI's) as a subprocess, with ImageReward.pt, its
  med_config.json and a local bert-base-uncased tokenizer folder.
- CLIP score (a sanity column): 100 x max(cosine, 0) with any local CLIP: an open_clip checkpoint file (with
  --clip_arch) or a Hugging Face CLIP folder.
- The world judge (the demo's synthetic world only; trainer/demo/judge.py): a person with a face and a hand found,
  person, face and hand found (0/1 each), and face and hand detail (0-1, left out where the part is not found).

Every scorer maps a list of (image path, prompt) to one float each.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training.config import ConfigError
from ..training.side_process import SideProcess

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ScorerError(ConfigError):
    """A scorer's weights are missing, of the wrong model, or its process failed; the message names the file."""


def pick_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ScorerError("HPS v2 and the open_clip CLIP score need open_clip (pip install .[eval])") from e
    return open_clip


def open_clip_model(arch: str, checkpoint: Path, flag: str, device: str):
    """open_clip's `arch` (a registered name such as ViT-H-14, or a model config JSON file) with the checkpoint's
    weights, strictly: every key of the architecture, nothing else."""
    open_clip = _open_clip()
    if arch.endswith(".json"):
        config = Path(arch)
        if not config.is_file():
            raise ScorerError(f"{flag}_arch {config}: no such file")
        open_clip.add_model_config(config)
        arch = config.stem
    if open_clip.get_model_config(arch) is None:
        raise ScorerError(f"{flag}_arch {arch!r}: not an open_clip model name or config file")
    if not checkpoint.is_file():
        raise ScorerError(f"{flag} {checkpoint}: no such file (give the local checkpoint; nothing is downloaded)")
    try:
        if checkpoint.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(checkpoint)
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise ScorerError(f"{flag} {checkpoint}: cannot read it as a checkpoint: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ScorerError(f"{flag} {checkpoint}: not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    with _quiet():                                 # open_clip logs every step of building a model at INFO
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ScorerError(f"{flag} {checkpoint}: not a {arch} checkpoint: {len(missing)} missing keys {missing[:3]}, "
                          f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} of another shape "
                          f"{shapes[:3]}")
    model.load_state_dict(state, strict=True)
    with _quiet():
        tokenizer = open_clip.get_tokenizer(arch)
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def _quiet():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def clip_transform(size: int):
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(size), T.Normalize(OPENAI_MEAN, OPENAI_STD)])


def _images(paths, transform, device):
    from PIL import Image

    batch = []
    for p in paths:
        with Image.open(p) as image:
            batch.append(transform(image.convert("RGB")))
    return torch.stack(batch).to(device)


@torch.no_grad()
def cosine_scores(scorer, items: list[tuple[Path, str]], clamp: bool) -> list[float]:
    """100 x the cosine of image and prompt features (clamped at 0 for the CLIP score), in batches of the
    scorer's batch_size; `scorer.features(images, prompts)` gives the two feature batches."""
    out = []
    for i in range(0, len(items), scorer.batch_size):
        chunk = items[i:i + scorer.batch_size]
        a, b = scorer.features(_images([p for p, _ in chunk], scorer.transform, scorer.device), [t for _, t in chunk])
        cos = (torch.nn.functional.normalize(a.float(), dim=-1) * torch.nn.functional.normalize(b.float(), dim=-1))
        cos = cos.sum(-1)
        out += (100 * (cos.clamp(min=0) if clamp else cos)).tolist()
    return out


@dataclass
class OpenClipScorer:
    """HPS v2 (clamp=False) or the CLIP score (clamp=True) with an open_clip model."""

    name: str
    checkpoint: Path
    arch: str
    flag: str
    clamp: bool = False
    device: str = "cpu"
    batch_size: int = 8

    def __post_init__(self):
        self.model, self.tokenizer = open_clip_model(self.arch, Path(self.checkpoint), self.flag, self.device)
        size = self.model.visual.image_size
        self.transform = clip_transform(size[0] if isinstance(size, (tuple, list)) else size)

    def features(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.tokenizer(prompts).to(self.device)
        with torch.autocast("cuda", enabled=self.device.startswith("cuda")):
            return self.model.encode_image(images), self.model.encode_text(text)

    def score(self, items: list[tuple[Path, str]]) -> list[float]:
        return cosine_scores(self, items, self.clamp)

    def close(self) -> None:
        self.model = None


@dataclass
class HFClipScorer:
    """The CLIP score with a Hugging Face CLIP folder (config.json, weights, tokenizer files)."""

    folder: Path
    device: str = "cpu"
    name: str = "clip"
    batch_size: int = 8

    def __post_init__(self):
        from transformers import CLIPModel, CLIPTokenizer

        if not (Path(self.folder) / "config.json").is_file():
            raise ScorerError(f"--clip {self.folder}: not a Hugging Face CLIP folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(self.folder, local_files_only=True).to(self.device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ScorerError(f"--clip {self.folder}: {e}") from e
        self.transform = clip_transform(self.model.config.vision_config.image_size)

    def features(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        a = self.model.get_image_features(pixel_values=images)
        b = self.model.get_text_features(**{k: v.to(self.device) for k, v in text.items()})
        return getattr(a, "pooler_output", a), getattr(b, "pooler_output", b)

    def score(self, items: list[tuple[Path, str]]) -> list[float]:
        return cosine_scores(self, items, clamp=True)

    def close(self) -> None:
        self.model = None


WORKER = Path(__file__).with_name("imagereward_worker.py")


class ImageRewardScorer:
    """ImageReward in its own environment's Python (a subprocess speaking JSON lines; see imagereward_worker.py)."""

    name = "imagereward"

    def __init__(self, checkpoint: Path, med_config: Path, tokenizer: Path | None, python: Path, device: str = "cpu",
                 worker: Path = WORKER):
        for path, flag in ((checkpoint, "--imagereward"), (med_config, "--imagereward_config"),
                           (python, "--imagereward_python")):
            if not Path(path).is_file():
                hint = " (build it: bash scripts/imagereward-env.sh)" if flag == "--imagereward_python" else ""
                raise ScorerError(f"{flag} {path}: no such file{hint}")
        if tokenizer is not None and not (Path(tokenizer) / "vocab.txt").is_file():
            raise ScorerError(f"--imagereward_tokenizer {tokenizer}: no vocab.txt there (bert-base-uncased's folder)")
        cmd = [str(python), str(worker), "--checkpoint", str(checkpoint), "--med_config", str(med_config),
               "--device", device] + (["--tokenizer", str(tokenizer)] if tokenizer else [])
        self.side = SideProcess(cmd, "ImageReward", ScorerError)

    def score(self, items: list[tuple[Path, str]]) -> list[float]:
        out = []
        for path, prompt in items:
            reply = self.side.ask({"image": str(path), "prompt": prompt})
            if "score" not in reply:
                raise ScorerError(f"ImageReward on {path}: {reply.get('error')}")
            out.append(float(reply["score"]))
        return out

    def close(self) -> None:
        self.side.close()


class WorldJudgeScorer:
    """One column of the demo world's judge (demo/judge.py): `all_found` (a person with a face and a hand),
    `person_found`, `face_found`, `hand_found` (0 or 1), `face_detail`, `hand_detail` (NaN where the part is not
    found: left out of the tables)."""

    def __init__(self, column: str, path: Path | None = None):
        from ..demo import judge

        if column not in WORLD_JUDGE_COLUMNS:
            raise ScorerError(f"world judge: no column {column!r} (columns: {', '.join(WORLD_JUDGE_COLUMNS)})")
        self.name, self.judge = column, judge.load(path or judge.SHIPPED)

    def score(self, items: list[tuple[Path, str]]) -> list[float]:
        return [v.scores()[self.name] for v in self.judge.judge_files([p for p, _ in items])]

    def close(self) -> None:
        self.judge = None


WORLD_JUDGE_COLUMNS = ("all_found", "person_found", "face_found", "hand_found", "face_detail", "hand_detail")


def from_args(args, device: str) -> list:
    """The scorers the command line asks for, in column order: hps, imagereward, clip. Loading one checks its
    files, so a wrong path fails before any image is made."""
    scorers = []
    if args.hps:
        scorers.append(lambda: OpenClipScorer("hps", args.hps, args.hps_arch, "--hps", device=device))
    if args.imagereward:
        scorers.append(lambda: ImageRewardScorer(args.imagereward, args.imagereward_config,
                                                 args.imagereward_tokenizer, args.imagereward_python, device))
    if args.clip:
        if Path(args.clip).is_dir():
            scorers.append(lambda: HFClipScorer(Path(args.clip), device))
        else:
            scorers.append(lambda: OpenClipScorer("clip", args.clip, args.clip_arch, "--clip", clamp=True,
                                                  device=device))
    if getattr(args, "world_judge", None):
        scorers += [lambda c=column: WorldJudgeScorer(c, args.world_judge) for column in WORLD_JUDGE_COLUMNS]
    return scorers


def check_files(args) -> None:
    """Before any image is made: every scorer file given exists (a typo should not cost a night of sampling)."""
    named = [(args.hps, "--hps"), (args.clip, "--clip"), (getattr(args, "world_judge", None), "--world_judge")]
    if args.imagereward:
        named += [(args.imagereward, "--imagereward"), (args.imagereward_config, "--imagereward_config"),
                  (args.imagereward_python, "--imagereward_python")]
        if args.imagereward_config is None:
            raise ScorerError("--imagereward needs --imagereward_config (ImageReward's med_config.json)")
    for path, flag in named:
        if path is not None and not Path(path).exists():
            raise ScorerError(f"{flag} {path}: no such file")
    if not (args.hps or args.imagereward or args.clip or getattr(args, "world_judge", None)):
        raise ScorerError("no scorer: give --hps (HPS v2 checkpoint), --imagereward (ImageReward.pt) and/or --clip "
                          "(or, for the demo's world, --world_judge)")


DEFAULT_IMAGEREWARD_PYTHON = Path(__file__).resolve().parents[2] / ".venv-imagereward" / "bin" / "python"
__all__ = ["OpenClipScorer", "HFClipScorer", "ImageRewardScorer", "WorldJudgeScorer", "WORLD_JUDGE_COLUMNS", "ScorerError", "from_args", "check_files",
           "pick_device", "DEFAULT_IMAGEREWARD_PYTHON"]
