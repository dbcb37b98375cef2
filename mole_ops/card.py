"""A shared MoLE's card: what a person reads before using it, and the settings it was made for.

Written into a pack's metadata (`pack_file.save(card=...)`):
- Stability AI's model spec keys as kohya writes them: `modelspec.sai_model_spec`, `.architecture`,
  `.implementation`, `.title`, `.description`, `.author`, `.license`, `.date`, `.tags` (comma-separated),
  `.usage_hint`, `.thumbnail` (a data URI of a small picture);
- MoLE's own: `mole.pack_base_model` (the checkpoint it needs, in words), `mole.pack_recommended` (JSON: gate mode,
  strength per expert role, start and end percent, sampler steps, CFG, sampler, scheduler).

Read from a card TOML (`python -m trainer pack --card`), strictly: an unknown key or a wrong type stops the pack
with the file and the key named. Read back from a pack, leniently: a missing or malformed field is reported and
left out, so a card can never fail a load.
"""
from __future__ import annotations

import base64
import datetime
import io
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import FormatError
from .ops import MODES

SPEC_VERSION = "1.0.0"
ARCHITECTURES = {"SD1.5": "stable-diffusion-v1/lora", "SDXL": "stable-diffusion-xl-v1-base/lora"}
IMPLEMENTATIONS = {"SD1.5": "diffusers", "SDXL": "https://github.com/Stability-AI/generative-models"}
THUMBNAIL_MAX_BYTES = 256 * 1024      # an embedded picture bigger than this is refused: metadata is read whole
THUMBNAIL_MAX_SIDE = 512
THUMBNAIL_SIDE = 256                   # a thumbnail made from a preview


@dataclass
class Recommended:
    """The settings the author checked the MoLE with: Apply MoLE's (mode, strengths by role, step range) and the
    sampler's (steps, CFG, sampler, scheduler)."""

    mode: str = "both"
    strengths: dict[str, float] = field(default_factory=dict)
    start_percent: float = 0.0
    end_percent: float = 1.0
    steps: int = 20
    cfg: float = 7.5
    sampler: str = "euler"
    scheduler: str = "normal"

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when they can be used)."""
        out = []
        if self.mode not in MODES:
            out.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        for role, s in self.strengths.items():
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s <= 4:
                out.append(f"strength of {role!r} is {s!r}, not a number from 0 to 4")
        for name in ("start_percent", "end_percent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                out.append(f"{name} is {v!r}, not a number from 0 to 1")
        if not out and self.start_percent > self.end_percent:
            out.append(f"start_percent {self.start_percent} is after end_percent {self.end_percent}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 10000:
            out.append(f"steps is {self.steps!r}, not a whole number from 1 to 10000")
        if isinstance(self.cfg, bool) or not isinstance(self.cfg, (int, float)) or not 0 <= self.cfg <= 100:
            out.append(f"cfg is {self.cfg!r}, not a number from 0 to 100")
        for name in ("sampler", "scheduler"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                out.append(f"{name} is {getattr(self, name)!r}, not a name")
        return out


@dataclass
class Card:
    title: str = ""
    description: str = ""
    author: str = ""
    license: str = ""
    base_model: str = ""
    tags: list[str] = field(default_factory=list)
    usage_hint: str = ""
    thumbnail: str = ""          # data URI
    date: str = ""
    recommended: Recommended | None = None


TEXT_FIELDS = ("title", "description", "author", "license", "base_model", "usage_hint")
RECOMMENDED_FIELDS = {"mode": str, "strengths": dict, "start_percent": float, "end_percent": float, "steps": int,
                      "cfg": float, "sampler": str, "scheduler": str}


def read_toml(path: str | Path) -> Card:
    """A card TOML: the text fields, `tags` (a list of strings), and a `[recommended]` table. Strict."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FormatError(f"card {path}: cannot be read as TOML ({e})") from e
    known = set(TEXT_FIELDS) | {"tags", "recommended"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise FormatError(f"card {path}: unknown key(s) {unknown}; a card has {sorted(known)}")
    card = Card()
    for key in TEXT_FIELDS:
        if key in doc:
            if not isinstance(doc[key], str):
                raise FormatError(f"card {path}: {key} = {doc[key]!r} should be a string")
            setattr(card, key, doc[key].strip())
    if "tags" in doc:
        if not isinstance(doc["tags"], list) or not all(isinstance(t, str) and t.strip() for t in doc["tags"]):
            raise FormatError(f"card {path}: tags = {doc['tags']!r} should be a list of words")
        card.tags = [t.strip() for t in doc["tags"]]
    if "recommended" in doc:
        table = doc["recommended"]
        if not isinstance(table, dict):
            raise FormatError(f"card {path}: recommended should be a table ([recommended])")
        card.recommended, problems = _recommended(table)
        if problems:
            raise FormatError(f"card {path}: [recommended] " + "; ".join(problems))
    return card


def _recommended(table: dict) -> tuple[Recommended, list[str]]:
    """A Recommended from a table (TOML or the pack's JSON), with what was wrong with it."""
    problems = [f"unknown key {k!r}" for k in sorted(set(table) - set(RECOMMENDED_FIELDS))]
    values = {}
    for key, kind in RECOMMENDED_FIELDS.items():
        if key not in table:
            continue
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is dict:
            if not isinstance(value, dict):
                problems.append(f"strengths should be a table of role = strength, got {value!r}")
                continue
            value = {str(k): float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                     for k, v in value.items()}
        values[key] = value
    rec = Recommended(**values)
    return rec, problems + rec.problems()


def thumbnail(path: str | Path, made_from_preview: bool = False) -> str:
    """A data URI of a picture for `modelspec.thumbnail`. A preview (made_from_preview) is scaled down to
    THUMBNAIL_SIDE and stored as JPEG; a given thumbnail is stored as it is, and refused if it is larger than
    THUMBNAIL_MAX_SIDE pixels or THUMBNAIL_MAX_BYTES."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if made_from_preview:
                im = im.convert("RGB")
                im.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                buffer = io.BytesIO()
                im.save(buffer, "JPEG", quality=85)
                data, mime = buffer.getvalue(), "image/jpeg"
            else:
                side, fmt = max(im.size), (im.format or "").upper()
                data = path.read_bytes()
                mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}.get(fmt)
                if mime is None:
                    raise FormatError(f"thumbnail {path}: a {fmt or 'unknown'} picture; give a PNG, JPEG or WebP")
                if side > THUMBNAIL_MAX_SIDE or len(data) > THUMBNAIL_MAX_BYTES:
                    raise FormatError(
                        f"thumbnail {path}: {im.size[0]}x{im.size[1]} px, {len(data) // 1024} KiB; a thumbnail is "
                        f"stored in the file's header, so at most {THUMBNAIL_MAX_SIDE} px and "
                        f"{THUMBNAIL_MAX_BYTES // 1024} KiB (a {THUMBNAIL_SIDE} px JPEG is about 15 KiB); shrink it, "
                        "or leave --thumbnail out to make one from --preview")
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001  (PIL raises many types for a file that is not a picture)
        raise FormatError(f"picture {path}: cannot be read ({type(e).__name__}: {e})") from e
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def to_metadata(card: Card, family: str) -> dict[str, str]:
    """The card as pack metadata (see the module docstring); empty fields are left out."""
    meta = {"modelspec.sai_model_spec": SPEC_VERSION, "modelspec.architecture": ARCHITECTURES[family],
            "modelspec.implementation": IMPLEMENTATIONS[family],
            "modelspec.date": card.date or datetime.date.today().isoformat()}
    for key in ("title", "description", "author", "license", "usage_hint", "thumbnail"):
        if getattr(card, key):
            meta[f"modelspec.{key}"] = getattr(card, key)
    if card.tags:
        meta["modelspec.tags"] = ", ".join(card.tags)
    if card.base_model:
        meta["mole.pack_base_model"] = card.base_model
    if card.recommended is not None:
        meta["mole.pack_recommended"] = json.dumps(asdict(card.recommended))
    return meta


def from_metadata(metadata: dict[str, str]) -> tuple[Card | None, list[str]]:
    """The card of a pack's metadata, or None when it has none; and what was malformed (reported, left out)."""
    if not any(k.startswith("modelspec.") or k.startswith(("mole.pack_base_model", "mole.pack_recommended"))
               for k in metadata):
        return None, []
    card, problems = Card(), []
    for key in ("title", "description", "author", "license", "usage_hint", "date"):
        value = metadata.get(f"modelspec.{key}")
        if value is not None:
            setattr(card, key, value)
    card.base_model = metadata.get("mole.pack_base_model", "")
    card.tags = [t.strip() for t in metadata.get("modelspec.tags", "").split(",") if t.strip()]
    thumb = metadata.get("modelspec.thumbnail", "")
    if thumb and not thumb.startswith("data:image/"):
        problems.append("modelspec.thumbnail is not a data:image/ URI (left out)")
    else:
        card.thumbnail = thumb
    raw = metadata.get("mole.pack_recommended")
    if raw is not None:
        try:
            table = json.loads(raw)
        except json.JSONDecodeError as e:
            table, why = None, f"not JSON ({e.msg})"
        else:
            why = "not a JSON object"
        if not isinstance(table, dict):
            problems.append(f"mole.pack_recommended is {why} (the recommended settings are left out)")
        else:
            rec, found = _recommended(table)
            if found:
                problems.append("mole.pack_recommended: " + "; ".join(found) + " (the recommended settings are left "
                                "out)")
            else:
                card.recommended = rec
    return card, problems


def summary(card: Card) -> list[str]:
    """Lines for a node's info: title, base, author and licence, the recommended settings."""
    lines = [f"card: {card.title or '(no title)'}" + (f" by {card.author}" if card.author else "")
             + (f", licence {card.license}" if card.license else "")]
    if card.base_model:
        lines.append(f"base: {card.base_model}")
    if card.usage_hint:
        lines.append(f"usage: {card.usage_hint}")
    r = card.recommended
    if r is not None:
        strengths = ", ".join(f"{k} {v:g}" for k, v in r.strengths.items()) or "1 each"
        lines.append(f"recommended: mode {r.mode}, strengths {strengths}, steps {r.start_percent:g}-"
                     f"{r.end_percent:g} of the schedule; sampler {r.sampler} {r.scheduler}, {r.steps} steps, "
                     f"CFG {r.cfg:g}")
    return lines
