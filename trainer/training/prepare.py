"""Dataset preparation as in the MoLE paper (SPEC.md section 5): large images cut into square sliding-window crops
resized to the training size, captions cleaned of captioner boilerplate, an optional image-text (CLIP) score
filter, and a kohya fine-tune metadata JSON for `--train_data_dir ... --in_json ...`.

    python -m trainer prepare --input_dir raw --output_dir prepared [--window 1024 --size 512]
        [--clip_model /models/clip-vit-large-patch14 --clip_threshold 20]

Input: images with captions, either in caption files next to them (`<stem><caption_extension>`) or in a kohya
metadata JSON/JSONL (`--in_json`). Output: `images/<stem>_<n>.png` (or .jpg), `metadata.json`
`{key: {"caption", "train_resolution"}}`, and `prepare_report.md` / `prepare_report.json` saying what was kept,
what was dropped and why (plus a histogram of CLIP scores when they were computed). The input is never modified;
every output file is written to a temp file and renamed.

Crops: an image whose short side is at least --window gives --window squares every --stride pixels along each
axis (the last one flush with the edge); a smaller image whose short side is at least --size gives its centre
square; a smaller one is dropped. Each crop is resized to --size. The crops of one image share its caption,
which is what the CLIP filter is for: it drops the crops the caption does not describe.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ...mole_ops.atomic import replacing, write_text
from .config import ConfigError
from .data import IMAGE_EXTENSIONS, read_metadata

log = logging.getLogger("mole.prepare")

# Boilerplate of image captioners (LLaVA and alike): an opening that names the picture instead of its content,
# and a closing participle clause that interprets instead of describing ("..., creating a serene atmosphere.").
OPENINGS = re.compile(r"^\s*(?:in\s+(?:the|this)\s+(?:image|picture|photo(?:graph)?|scene),?\s*"
                      r"|(?:the|this)\s+(?:image|picture|photo(?:graph)?|scene)\s+(?:features|shows|depicts|"
                      r"displays|captures|presents|showcases|portrays|contains|is\s+of)\s+)", re.I)
CLAUSES = ("showcasing", "creating", "demonstrating", "highlighting", "emphasizing", "emphasising", "adding",
           "giving", "suggesting", "conveying", "evoking", "reflecting")
CLAUSE = re.compile(r",?\s*\b(?:" + "|".join(CLAUSES) + r")\b[^.;!?]*", re.I)


def clean_caption(text: str, extra_phrases: tuple[str, ...] = ()) -> str:
    """The caption without boilerplate: per sentence, the opening ("The image features ...") and the
    interpreting clauses (", showcasing ...", ", creating ...", ...) are removed, then any `extra_phrases`
    (literal, case-insensitive); whitespace and punctuation are tidied."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]
    out = []
    for sentence in sentences:
        sentence = OPENINGS.sub("", sentence)
        sentence = CLAUSE.sub("", sentence)
        for phrase in extra_phrases:
            sentence = re.sub(re.escape(phrase), "", sentence, flags=re.I)
        sentence = re.sub(r"\s+([,.;!?])", r"\1", " ".join(sentence.split()))
        sentence = re.sub(r"([,;])\1+", r"\1", sentence).strip(" ,;")
        if sentence.strip(" .!?"):
            out.append(sentence)
    return " ".join(out)


def windows(width: int, height: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(left, top, side) of the square crops of an image (see the module docstring)."""
    def starts(length: int) -> list[int]:
        positions = list(range(0, length - window + 1, stride))
        if positions[-1] + window < length:
            positions.append(length - window)
        return positions

    if min(width, height) >= window:
        return [(x, y, window) for y in starts(height) for x in starts(width)]
    side = min(width, height)
    return [((width - side) // 2, (height - side) // 2, side)]


@dataclass
class Report:
    sources: int = 0
    kept_sources: int = 0
    crops: int = 0
    written: int = 0
    dropped_sources: Counter = field(default_factory=Counter)
    dropped_crops: Counter = field(default_factory=Counter)
    cleaned: list = field(default_factory=list)         # (before, after) of captions the clean-up changed
    scores: list = field(default_factory=list)          # CLIP scores of every crop scored
    rows: list = field(default_factory=list)            # per source: file, crops written, reason if dropped

    def as_dict(self) -> dict:
        return {"sources": self.sources, "kept_sources": self.kept_sources, "crops": self.crops,
                "written": self.written, "dropped_sources": dict(self.dropped_sources),
                "dropped_crops": dict(self.dropped_crops), "captions_cleaned": len(self.cleaned),
                "clip_scores": _stats(self.scores), "files": self.rows}


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}


class ClipScorer:
    """Image-text score 100 x cos(image embedding, text embedding) of a user's CLIP model: a Hugging Face folder
    (config.json, weights, tokenizer and preprocessor files), e.g. openai/clip-vit-large-patch14 saved locally."""

    def __init__(self, path: Path):
        try:
            import transformers
        except ImportError as e:
            raise ConfigError("--clip_model needs the transformers package (ComfyUI installs it)") from e
        if not Path(path).is_dir():
            raise ConfigError(f"--clip_model {path}: not a folder (give a local Hugging Face CLIP folder)")
        try:
            self.model = transformers.CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
            self.processor = transformers.CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--clip_model {path}: not a Hugging Face CLIP folder (needs config.json, the weights, "
                              f"tokenizer and preprocessor_config.json): {e}") from e

    def __call__(self, images: list, captions: list[str]) -> list[float]:
        import torch

        inputs = self.processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True,
                                max_length=77)
        with torch.no_grad():
            out = self.model(**inputs)
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (100 * (image * text).sum(-1)).tolist()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input_dir", required=True, type=Path, help="folder of images (with caption files)")
    parser.add_argument("--output_dir", required=True, type=Path, help="where images/, metadata.json and the "
                        "report go (not the input folder)")
    parser.add_argument("--in_json", type=Path, help="kohya metadata JSON/JSONL with the captions (instead of "
                        "caption files)")
    parser.add_argument("--caption_extension", default=".caption", help="caption file extension (default .caption)")
    parser.add_argument("--window", type=int, default=1024, help="side of the sliding-window crops (default 1024)")
    parser.add_argument("--stride", type=int, help="step between windows (default: --window, no overlap)")
    parser.add_argument("--size", type=int, default=512, help="side the crops are resized to (default 512)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image format of the crops")
    parser.add_argument("--drop_phrase", nargs="*", default=[], help="more phrases to remove from captions")
    parser.add_argument("--clip_model", type=Path, help="local Hugging Face CLIP folder for the image-text score")
    parser.add_argument("--clip_threshold", type=float, help="drop crops whose score (100 x cosine) is below "
                        "this (the authors used 20 and 25); without it scores are only reported")
    parser.add_argument("--batch_size", type=int, default=16, help="crops per CLIP batch")
    parser.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    if not args.input_dir.is_dir():
        raise ConfigError(f"--input_dir {args.input_dir}: no such folder")
    if args.output_dir.resolve() == args.input_dir.resolve():
        raise ConfigError("--output_dir must differ from --input_dir (the input is never modified)")
    if args.in_json and not args.in_json.exists():
        raise ConfigError(f"--in_json {args.in_json}: no such file")
    if args.size < 8 or args.size % 8 or args.window < args.size:
        raise ConfigError(f"--size {args.size} must be a multiple of 8, and --window ({args.window}) at least --size")
    args.stride = args.stride or args.window
    if not 0 < args.stride <= args.window:
        raise ConfigError(f"--stride {args.stride} must be between 1 and --window ({args.window})")
    if args.clip_threshold is not None and not args.clip_model:
        raise ConfigError("--clip_threshold needs --clip_model (the CLIP that computes the score)")


def run(args: argparse.Namespace) -> int:
    prepare(args)
    return 0


def prepare(args: argparse.Namespace) -> Report:
    from PIL import Image, UnidentifiedImageError
    from .progress import bar

    check(args)
    scorer = ClipScorer(args.clip_model) if args.clip_model else None
    captions = read_metadata(args.in_json) if args.in_json else None
    images_dir = args.output_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    report, metadata, pending = Report(), {}, []
    sources = sorted(p for p in args.input_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not sources:
        raise ConfigError(f"--input_dir {args.input_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")

    def drop(source: Path, reason: str) -> None:
        report.dropped_sources[reason] += 1
        report.rows.append({"file": source.name, "crops": 0, "dropped": reason})

    def flush() -> None:
        """Score (when a CLIP is given) and write the pending crops."""
        scores = scorer([c[1] for c in pending], [c[2] for c in pending]) if scorer else [None] * len(pending)
        for (key, crop, caption, row), score in zip(pending, scores):
            if score is not None:
                report.scores.append(score)
            if score is not None and args.clip_threshold is not None and score < args.clip_threshold:
                report.dropped_crops[f"CLIP score below {args.clip_threshold:g}"] += 1
                continue
            with replacing(images_dir / f"{key}.{args.format}") as tmp:
                crop.save(tmp, format="PNG" if args.format == "png" else "JPEG", quality=95)
            metadata[key] = {"caption": caption, "train_resolution": [args.size, args.size]}
            row["crops"] += 1
            report.written += 1
        pending.clear()

    for source in bar(sources, desc="preparing", unit="img"):
        report.sources += 1
        if captions is not None:
            raw = captions.get(source.stem)
        else:
            caption_file = source.with_suffix(args.caption_extension)
            raw = caption_file.read_text(errors="replace") if caption_file.exists() else None
        if raw is None:
            drop(source, "no caption")
            continue
        caption = clean_caption(raw, tuple(args.drop_phrase))
        if caption != " ".join(raw.split()):
            report.cleaned.append((" ".join(raw.split()), caption))
        if not caption:
            drop(source, "empty caption after clean-up")
            continue
        try:
            with Image.open(source) as im:
                im.load()
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            drop(source, "unreadable image")
            continue
        if min(image.size) < args.size:
            drop(source, f"smaller than {args.size} px")
            continue
        report.kept_sources += 1
        row = {"file": source.name, "crops": 0, "dropped": ""}
        report.rows.append(row)
        for n, (left, top, side) in enumerate(windows(*image.size, args.window, args.stride)):
            crop = image.crop((left, top, left + side, top + side))
            if side != args.size:
                crop = crop.resize((args.size, args.size), Image.Resampling.LANCZOS)
            report.crops += 1
            pending.append((f"{source.stem}_{n}", crop, caption, row))
            if len(pending) >= args.batch_size:
                flush()
    flush()
    write_text(args.output_dir / "metadata.json", json.dumps(metadata, indent=1, ensure_ascii=False))
    write_report(args, report)
    log.info("prepare: %d of %d images kept, %d crops written of %d; report: %s", report.kept_sources,
             report.sources, report.written, report.crops, args.output_dir / "prepare_report.md")
    return report


def write_report(args: argparse.Namespace, report: Report) -> None:
    out = args.output_dir
    write_text(out / "prepare_report.json", json.dumps(report.as_dict(), indent=1, ensure_ascii=False))
    lines = [f"# Dataset preparation: {args.input_dir}", "",
             f"- images: {report.sources} found, {report.kept_sources} kept",
             f"- crops: {report.crops} cut ({args.window} px windows every {args.stride} px, resized to "
             f"{args.size} px), {report.written} written to `images/`",
             f"- captions changed by the clean-up: {len(report.cleaned)}", ""]
    if report.dropped_sources or report.dropped_crops:
        lines += ["## Dropped", "", "| what | reason | count |", "|---|---|---|"]
        lines += [f"| image | {r} | {n} |" for r, n in report.dropped_sources.most_common()]
        lines += [f"| crop | {r} | {n} |" for r, n in report.dropped_crops.most_common()]
        lines.append("")
    if report.scores:
        from ...mole_ops.plots import histogram, save_png

        s = _stats(report.scores)
        marks = (args.clip_threshold,) if args.clip_threshold is not None else ()
        save_png(histogram(report.scores, title="CLIP image-text score of every crop", xlabel="100 x cosine",
                           ylabel="crops", marks=marks), str(out / "clip_scores.png"))
        lines += ["## CLIP scores", "", f"min {s['min']:.2f}, median {s['median']:.2f}, max {s['max']:.2f} over "
                  f"{s['n']} crops" + (f"; threshold {args.clip_threshold:g} (dashed)" if marks else ""), "",
                  "![CLIP scores](clip_scores.png)", ""]
    if report.cleaned:
        lines += ["## Caption clean-up (first 10)", "", "| before | after |", "|---|---|"]
        lines += [f"| {_cell(a)} | {_cell(b)} |" for a, b in report.cleaned[:10]]
        lines.append("")
    lines += ["## Files", "", "| image | crops | dropped because |", "|---|---|---|"]
    lines += [f"| {_cell(r['file'])} | {r['crops']} | {r['dropped']} |" for r in report.rows]
    write_text(out / "prepare_report.md", "\n".join(lines) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
