"""The paper's two human-centric prompt benchmarks, built from a user's own copies of COCO and DiffusionDB:

    python -m trainer prompts --coco annotations/captions_val2014.json --output_dir prompts/coco
    python -m trainer prompts --diffusiondb metadata.parquet --output_dir prompts/diffusiondb

COCO Human Prompts: the captions of a COCO captions JSON (the val set, as the paper) that name a person. DiffusionDB
Human Prompts: the prompts of DiffusionDB's metadata table (parquet, which needs pyarrow from `pip install
.[eval]`, or a CSV export) that name a person, with rows flagged NSFW dropped (`prompt_nsfw` or `image_nsfw` at or
above --nsfw_threshold, 0.5 by default; DiffusionDB scores both in 0..1 and marks images Stable Diffusion blurred
with 2.0) and prompts holding special symbols dropped (SPECIAL below: weighting and template syntax).

A prompt names a person when one of the human words (HUMAN_WORDS, or --human_words as a comma list or a file of
one word per line) occurs as a whole word, case-insensitive, singular or plural (irregular plurals included:
woman/women, child/children, person/people, ...). Duplicates are dropped (after collapsing whitespace, ignoring
case). Then --repeats samples of --k prompts each are drawn without replacement from what is left, with --seed
(the paper: 3000 prompts, three repeats); every row gets its own generation seed, which every model evaluated on
the file shares.

Writes prompts.csv (repeat, prompt_id, seed, prompt) and prompts_report.md/.json: counts, what was dropped and
why, with examples.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import re
from collections import Counter
from pathlib import Path

from ...mole_ops.atomic import replacing, write_text
from ..training.config import ConfigError

HUMAN_WORDS = ("woman", "man", "kid", "girl", "boy", "person", "teenager", "child", "baby", "toddler", "lady",
               "gentleman", "guy", "people", "adult", "mother", "father", "daughter", "son", "player", "skier",
               "surfer", "skateboarder", "snowboarder", "rider", "human")
IRREGULAR = {"woman": "women", "man": "men", "child": "children", "person": "people", "lady": "ladies",
             "gentleman": "gentlemen", "baby": "babies"}
SPECIAL = "[]{}()<>|\\^~@#$%*=:"
NSFW_COLUMNS = ("prompt_nsfw", "image_nsfw")


def human_pattern(words=HUMAN_WORDS) -> re.Pattern:
    """Whole words, any case, singular or plural: word, words, wordes and the irregular plural."""
    forms = set()
    for word in words:
        word = word.strip().lower()
        if word:
            forms |= {word, word + "s", word + "es", IRREGULAR.get(word, word)}
    return re.compile(r"\b(" + "|".join(sorted(map(re.escape, forms), key=len, reverse=True)) + r")\b", re.I)


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def coco_captions(path: Path) -> list[str]:
    try:
        doc = json.loads(path.read_text())
        return [str(a["caption"]) for a in doc["annotations"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"--coco {path}: not a COCO captions JSON ({{\"annotations\": [{{\"caption\": ...}}]}}): "
                          f"{e}") from e


def diffusiondb_rows(path: Path) -> list[dict]:
    """Rows with prompt and the NSFW columns, from metadata.parquet (pyarrow) or a CSV export."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ConfigError(f"--diffusiondb {path}: reading parquet needs pyarrow (pip install .[eval]), or "
                              "give a CSV export") from e
        table = pq.read_table(path, columns=[c for c in ("prompt", *NSFW_COLUMNS)
                                             if c in pq.read_schema(path).names])
        rows = table.to_pylist()
    else:
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError as e:
            raise ConfigError(f"--diffusiondb {path}: {e}") from e
    if not rows or "prompt" not in rows[0]:
        raise ConfigError(f"--diffusiondb {path}: no rows with a 'prompt' column")
    return rows


def select(texts: list[tuple[str, dict]], words, nsfw_threshold: float | None, special: str | None):
    """(kept unique prompts, {reason: count}, {reason: examples}) for (prompt, row) pairs."""
    pattern = human_pattern(words)
    kept, seen = [], set()
    dropped, examples = Counter(), {}

    def drop(reason: str, text: str) -> None:
        dropped[reason] += 1
        examples.setdefault(reason, [])
        if len(examples[reason]) < 3:
            examples[reason].append(text)

    for text, row in texts:
        text = " ".join(str(text or "").split())
        if not text:
            drop("empty", text)
            continue
        if nsfw_threshold is not None:
            flagged = [c for c in NSFW_COLUMNS if _score(row.get(c)) >= nsfw_threshold]
            if flagged:
                drop(f"flagged NSFW ({', '.join(flagged)} >= {nsfw_threshold:g})", text)
                continue
        if special and any(ch in text for ch in special):
            drop("special symbols", text)
            continue
        if not pattern.search(text):
            drop("no human word", text)
            continue
        key = _normal(text)
        if key in seen:
            drop("duplicate", text)
            continue
        seen.add(key)
        kept.append(text)
    return kept, dict(dropped), examples


def _score(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("-inf")           # missing scores flag nothing


def sample(prompts: list[str], k: int, repeats: int, seed: int) -> list[dict]:
    """repeats x k rows: each repeat draws k distinct prompts (all of them if fewer); one generation seed per row."""
    rng = random.Random(seed)
    index = list(range(len(prompts)))
    rows = []
    for repeat in range(repeats):
        chosen = rng.sample(index, min(k, len(index)))
        start = len(rows)
        rows += [{"repeat": repeat, "prompt_id": i, "seed": seed * 1_000_003 + start + j, "prompt": prompts[i]}
                 for j, i in enumerate(chosen)]
    return rows


def read_words(value: str | None):
    if not value:
        return HUMAN_WORDS
    path = Path(value)
    if path.is_file():
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    return tuple(w.strip() for w in value.split(",") if w.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco", type=Path, help="COCO captions JSON (captions_val2014.json or val2017)")
    source.add_argument("--diffusiondb", type=Path, help="DiffusionDB metadata.parquet (or a CSV export)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--k", type=int, default=3000, help="prompts per repeat (the paper: 3000)")
    parser.add_argument("--repeats", type=int, default=3, help="independent draws of k prompts (the paper: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--human_words", help="comma list or file (one per line) replacing the built-in list")
    parser.add_argument("--nsfw_threshold", type=float, default=0.5, help="DiffusionDB: drop rows whose "
                        "prompt_nsfw or image_nsfw is at least this")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.k < 1 or args.repeats < 1:
        raise ConfigError("--k and --repeats must be at least 1")
    words = read_words(args.human_words)
    if args.coco:
        name, texts = "COCO Human Prompts", [(c, {}) for c in coco_captions(args.coco)]
        kept, dropped, examples = select(texts, words, None, None)
    else:
        name = "DiffusionDB Human Prompts"
        texts = [(r.get("prompt"), r) for r in diffusiondb_rows(args.diffusiondb)]
        kept, dropped, examples = select(texts, words, args.nsfw_threshold, SPECIAL)
    if not kept:
        raise ConfigError(f"{args.coco or args.diffusiondb}: no prompt is left after the filters ({dropped})")
    rows = sample(kept, args.k, args.repeats, args.seed)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / "prompts.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, ["repeat", "prompt_id", "seed", "prompt"])
            writer.writeheader()
            writer.writerows(rows)
    report = {"benchmark": name, "source": str(args.coco or args.diffusiondb), "rows_read": len(texts),
              "kept_unique": len(kept), "dropped": dropped, "examples": examples, "k": args.k,
              "repeats": args.repeats, "seed": args.seed, "rows_written": len(rows), "human_words": list(words)}
    write_text(out / "prompts_report.json", json.dumps(report, indent=1))
    lines = [f"# {name}", "", f"From {report['source']}: {len(texts)} rows read, {len(kept)} unique prompts kept, "
             f"{len(rows)} rows written ({args.repeats} repeats x {min(args.k, len(kept))} prompts, seed {args.seed}).",
             "", "| dropped because | rows | examples |", "|---|---|---|"]
    lines += [f"| {reason} | {count} | {'; '.join(examples[reason])} |" for reason, count in dropped.items()]
    lines += ["", f"Human words: {', '.join(words)} (whole words, plurals included)."]
    write_text(out / "prompts_report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
