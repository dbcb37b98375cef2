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

import numpy as np

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
    detected: Counter = field(default_factory=Counter)   # crops with a mask of each part (--detect)
    closeups: Counter = field(default_factory=Counter)   # close-ups written per part (--closeups)
    no_person: list = field(default_factory=list)       # images the person filter dropped
    sheet: list = field(default_factory=list)           # (crop, {part: mask}) drawn in the report

    def as_dict(self) -> dict:
        return {"sources": self.sources, "kept_sources": self.kept_sources, "crops": self.crops,
                "written": self.written, "dropped_sources": dict(self.dropped_sources),
                "dropped_crops": dict(self.dropped_crops), "captions_cleaned": len(self.cleaned),
                "clip_scores": _stats(self.scores), "files": self.rows, "detected": dict(self.detected),
                "closeups": dict(self.closeups), "no_person": self.no_person}


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
    d = parser.add_argument_group("faces, hands and people (a detector in its own environment: make detector-env)")
    d.add_argument("--detect", type=_parts, default=[], metavar="face,hand", help="region masks of these parts for "
                   "every crop: masks/<crop>_<part>.png (expert-effect, evaluate --heldout), masks_<part>/ (that "
                   "expert's conditioning_data_dir for --masked_loss), masks_all/; plus caption files and <part>.toml")
    d.add_argument("--closeups", type=_parts, default=[], metavar="face,hand", help="square close-ups around each "
                   "detection in the full picture (padded where they leave it), each with its caption and mask, in "
                   "closeups_<part>/ (and its subset in <part>.toml)")
    d.add_argument("--closeup_size", type=int, default=512, help="side of the close-ups (default 512, the paper's)")
    d.add_argument("--closeup_min", type=int, default=256, help="skip close-ups whose square in the picture is "
                   "smaller than this many pixels (default 256; they would be upscaled)")
    d.add_argument("--closeup_context", type=float, default=1.0, help="context around a detection: the square is "
                   "its longer side x (1 + this) (default 1)")
    d.add_argument("--closeup_caption", default="a close-up of a {part}, {caption}", help="caption of a close-up; "
                   "{part} and {caption} (the picture's) are filled in")
    d.add_argument("--require", choices=("person",), help="drop pictures in which the detector finds no person "
                   "(no body pose, face or hand)")
    d.add_argument("--detect_threshold", type=float, default=0.5, help="the detector's minimum confidence "
                   "(default 0.5)")
    d.add_argument("--mask_margin", type=float, default=0.15, help="masks grow by this share of the part's size "
                   "(default 0.15)")
    d.add_argument("--detector_python", type=Path, default=None, help="the detector environment's Python "
                   "(default: .venv-detector/bin/python, which make detector-env builds)")
    parser.set_defaults(run=run)


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in ("face", "hand")]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: give face, hand or face,hand")
    return list(dict.fromkeys(parts))


def check(args: argparse.Namespace) -> None:
    """Every option checked (and the defaults of those a caller's Namespace leaves out filled in) before any work."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for key, value in vars(parser.parse_args(["--input_dir", ".", "--output_dir", "."])).items():
        if not hasattr(args, key):
            setattr(args, key, value)
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
    if args.closeup_size < 8 or args.closeup_size % 8 or args.closeup_min < 1 or args.closeup_context < 0:
        raise ConfigError("--closeup_size must be a multiple of 8, --closeup_min >= 1 and --closeup_context >= 0")
    if not 0 < args.detect_threshold < 1 or not 0 <= args.mask_margin <= 1:
        raise ConfigError("--detect_threshold must be in (0, 1) and --mask_margin in [0, 1]")
    try:
        args.closeup_caption.format(part="face", caption="x")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--closeup_caption {args.closeup_caption!r}: only {{part}} and {{caption}} ({e})") from e
    if args.detector_python is None:
        from .detector import DEFAULT_PYTHON

        args.detector_python = DEFAULT_PYTHON


def run(args: argparse.Namespace) -> int:
    prepare(args)
    return 0


def prepare(args: argparse.Namespace) -> Report:
    from .progress import bar

    check(args)
    sources = sorted(p for p in args.input_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not sources:
        raise ConfigError(f"--input_dir {args.input_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    run = Preparation(args)
    try:
        for source in bar(sources, desc="preparing", unit="img"):
            run.source(source)
        run.flush()
    finally:
        run.close()
    write_text(args.output_dir / "metadata.json", json.dumps(run.metadata, indent=1, ensure_ascii=False))
    if run.detector_used:
        write_dataset_tomls(args)
    write_report(args, run.report)
    report = run.report
    log.info("prepare: %d of %d images kept, %d crops written of %d; report: %s", report.kept_sources,
             report.sources, report.written, report.crops, args.output_dir / "prepare_report.md")
    return report


class Preparation:
    """One `prepare` run: the CLIP scorer and the detector (each only when asked for), the crops waiting for
    their CLIP batch, the metadata and the report."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.scorer = ClipScorer(args.clip_model) if args.clip_model else None
        self.detector_used = bool(args.detect or args.closeups or args.require)
        self.detector = None
        if self.detector_used:
            from .detector import Detector

            self.detector = Detector(args.detector_python, {p: args.detect_threshold
                                                            for p in ("face", "hand", "person")})
        self.captions = read_metadata(args.in_json) if args.in_json else None
        self.images_dir = args.output_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.report, self.metadata, self.pending = Report(), {}, []

    def close(self) -> None:
        if self.detector is not None:
            self.detector.close()

    def drop(self, source: Path, reason: str) -> None:
        self.report.dropped_sources[reason] += 1
        self.report.rows.append({"file": source.name, "crops": 0, "dropped": reason})

    def caption_of(self, source: Path) -> str | None:
        """The cleaned caption, or None after dropping the image for it."""
        if self.captions is not None:
            raw = self.captions.get(source.stem)
        else:
            caption_file = source.with_suffix(self.args.caption_extension)
            raw = caption_file.read_text(errors="replace") if caption_file.exists() else None
        if raw is None:
            self.drop(source, "no caption")
            return None
        caption = clean_caption(raw, tuple(self.args.drop_phrase))
        if caption != " ".join(raw.split()):
            self.report.cleaned.append((" ".join(raw.split()), caption))
        if not caption:
            self.drop(source, "empty caption after clean-up")
            return None
        return caption

    def source(self, source: Path) -> None:
        from PIL import Image, UnidentifiedImageError

        args, report = self.args, self.report
        report.sources += 1
        caption = self.caption_of(source)
        if caption is None:
            return
        try:
            with Image.open(source) as im:
                im.load()
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            self.drop(source, "unreadable image")
            return
        if min(image.size) < args.size:
            self.drop(source, f"smaller than {args.size} px")
            return
        if (args.require or args.closeups) and not self.look_at_source(source, image, caption):
            return
        report.kept_sources += 1
        row = {"file": source.name, "crops": 0, "dropped": ""}
        report.rows.append(row)
        for n, (left, top, side) in enumerate(windows(*image.size, args.window, args.stride)):
            crop = image.crop((left, top, left + side, top + side))
            if side != args.size:
                crop = crop.resize((args.size, args.size), Image.Resampling.LANCZOS)
            report.crops += 1
            self.pending.append((f"{source.stem}_{n}", crop, caption, row))
            if len(self.pending) >= args.batch_size:
                self.flush()

    def look_at_source(self, source: Path, image, caption: str) -> bool:
        """The detector on the whole picture: the person filter (False: dropped) and the close-ups."""
        args = self.args
        wanted = sorted(set(args.closeups) | ({"face", "hand"} if args.require else set()))
        found = self.detector.find(source, wanted + (["person"] if args.require else []))
        if found.error:
            self.drop(source, f"the detector could not read it ({found.error})")
            return False
        if args.require and not any(found.parts.get(p) for p in ("person", "face", "hand")):
            self.drop(source, "no person found by the detector")
            self.report.no_person.append(source.name)
            return False
        for part in args.closeups:
            self.closeups(source, image, caption, part, found.parts.get(part, []))
        return True

    def closeups(self, source: Path, image, caption: str, part: str, detections: list[dict]) -> None:
        from .detector import closeup_window, crop_padded, region_mask, save_mask

        args, report = self.args, self.report
        folder = args.output_dir / f"closeups_{part}"
        for i, d in enumerate(detections):
            window = closeup_window(d["box"], image.size, args.closeup_context)
            if window[2] < args.closeup_min:
                report.dropped_crops[f"{part} too small for a close-up (under {args.closeup_min} px)"] += 1
                continue
            name = f"{source.stem}_{part}{i}"
            folder.mkdir(parents=True, exist_ok=True)
            with replacing(folder / f"{name}.png") as tmp:
                crop_padded(image, window, args.closeup_size).save(tmp, format="PNG")
            mask = region_mask(image.size, [d], part, args.mask_margin)
            from PIL import Image

            small = crop_padded(Image.fromarray(mask.astype("uint8") * 255, "L"), window, args.closeup_size)
            save_mask(folder / "masks" / f"{name}.png", np.asarray(small) > 127)
            write_text(folder / f"{name}.caption", args.closeup_caption.format(part=part, caption=caption))
            report.closeups[part] += 1

    def flush(self) -> None:
        """Score (when a CLIP is given), write the pending crops, and find their parts (with --detect)."""
        args, report = self.args, self.report
        scores = self.scorer([c[1] for c in self.pending], [c[2] for c in self.pending]) if self.scorer else \
            [None] * len(self.pending)
        for (key, crop, caption, row), score in zip(self.pending, scores):
            if score is not None:
                report.scores.append(score)
            if score is not None and args.clip_threshold is not None and score < args.clip_threshold:
                report.dropped_crops[f"CLIP score below {args.clip_threshold:g}"] += 1
                continue
            path = self.images_dir / f"{key}.{args.format}"
            with replacing(path) as tmp:
                crop.save(tmp, format="PNG" if args.format == "png" else "JPEG", quality=95)
            self.metadata[key] = {"caption": caption, "train_resolution": [args.size, args.size]}
            row["crops"] += 1
            report.written += 1
            if args.detect:
                self.masks(key, path, caption)
        self.pending.clear()

    def masks(self, key: str, path: Path, caption: str) -> None:
        """Region masks of one written crop (detector.write_masks), and its caption file beside it (expert-effect
        and evaluate --heldout read caption files)."""
        from .detector import region_mask, write_masks

        found = self.detector.find(path, list(self.args.detect))
        if found.error:
            self.report.dropped_crops[f"no masks: the detector could not read it ({found.error})"] += 1
            return
        masks = {part: region_mask(found.size, found.parts[part], part, self.args.mask_margin)
                 for part in self.args.detect}
        write_masks(self.args.output_dir, key, masks)
        write_text(path.with_suffix(".caption"), caption)
        for part, mask in masks.items():
            self.report.detected[part] += int(mask.any())
        if len(self.report.sheet) < SHEET:
            self.report.sheet.append((path, masks))


SHEET = 12     # pictures with their masks drawn in the report


def write_dataset_tomls(args: argparse.Namespace) -> list[Path]:
    """`<part>.toml` per part found or cut out: kohya dataset TOMLs for that part's expert (with --masked_loss):
    the crops masked to the part (--detect), and its close-ups with their own masks (--closeups)."""
    out, written = args.output_dir, []
    for part in sorted(set(args.detect) | set(args.closeups)):
        lines = [f"# the {part} expert's data (python -m trainer prepare); train with --masked_loss"]
        if part in args.detect:
            lines += ["", "[[datasets]]", f"resolution = {args.size}", "  [[datasets.subsets]]",
                      '  image_dir = "images"', '  metadata_file = "metadata.json"',
                      f'  conditioning_data_dir = "masks_{part}"']
        if part in args.closeups and (out / f"closeups_{part}").is_dir():
            lines += ["", "[[datasets]]", f"resolution = {args.closeup_size}", "  [[datasets.subsets]]",
                      f'  image_dir = "closeups_{part}"', '  caption_extension = ".caption"',
                      f'  conditioning_data_dir = "closeups_{part}/masks"']
        if len(lines) > 1:
            written.append(write_text(out / f"{part}.toml", "\n".join(lines) + "\n"))
    return written


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
    lines += detection_section(args, report)
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


def detection_section(args: argparse.Namespace, report: Report) -> list[str]:
    """The detector's part of the report: what it found and made, how masks are drawn, the images the person
    filter dropped, and a contact sheet of masks over the first crops."""
    if not (args.detect or args.closeups or args.require):
        return []
    lines = ["## Faces, hands and people (mediapipe's bundled detectors)", "",
             f"- threshold {args.detect_threshold:g}; masks: a face is the ellipse in its box grown by "
             f"{args.mask_margin:.0%} on every side, a hand the convex hull of its 21 landmarks grown by "
             f"{args.mask_margin:.0%} around their centre"]
    lines += [f"- crops with a {part} mask: {report.detected[part]} of {report.written}" for part in args.detect]
    lines += [f"- {part} close-ups written: {report.closeups[part]} ({args.closeup_size} px, in `closeups_{part}/`)"
              for part in args.closeups]
    if args.require:
        shown = ", ".join(report.no_person[:10]) + (" ..." if len(report.no_person) > 10 else "")
        lines.append(f"- dropped, no person found: {len(report.no_person)}" + (f" ({shown})" if shown else ""))
    if report.sheet:
        contact_sheet(report.sheet).save(args.output_dir / "detections.png")
        lines += ["", "The first crops with their masks (face red, hand blue):", "", "![masks](detections.png)"]
    return lines + [""]


COLOURS = {"face": (230, 60, 40), "hand": (40, 110, 230)}


def contact_sheet(items: list, side: int = 160, columns: int = 4):
    """Pictures with their part masks tinted over them, in a grid."""
    from PIL import Image

    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    sheet = Image.new("RGB", (columns * side, rows * side), "white")
    for i, (path, masks) in enumerate(items):
        with Image.open(path) as im:
            picture = np.asarray(im.convert("RGB").resize((side, side))).astype(np.float32)
        for part, mask in masks.items():
            small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side))) > 127
            picture[small] = picture[small] * 0.5 + np.asarray(COLOURS.get(part, (0, 200, 0))) * 0.5
        sheet.paste(Image.fromarray(picture.astype(np.uint8)), ((i % columns) * side, (i // columns) * side))
    return sheet


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
