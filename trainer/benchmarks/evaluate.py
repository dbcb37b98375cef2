"""Did the experts and gates help, and by how much? The paper's Tables 1-3 on your own weights and scorers:

    python -m trainer evaluate --prompts prompts/coco/prompts.csv --models models.toml --output_dir eval/coco \\
        --hps HPS_v2_compressed.pt --imagereward ImageReward.pt --imagereward_config med_config.json \\
        --imagereward_tokenizer bert-base-uncased/ --clip clip-vit-large-patch14/

One image per prompt row (prompts.csv from `python -m trainer prompts`: repeat, prompt_id, seed, prompt) and model
(models.toml: see benchmarks/models.py), made by a real ComfyUI with the shipped txt2img workflow's graph and
sampler settings, the row's seed shared by every model. Then every image is scored (HPS v2, ImageReward, CLIP
score; see benchmarks/scorers.py) and summarised per model: mean +- standard error over the repeats, the paired
difference to the reference model with a 95% bootstrap interval, the win rate, plots and a contact sheet.

Writes, under --output_dir: images/<model>/r<repeat>-p<prompt id>-s<seed>.png, scores.csv (one row per image),
summary.json, summary.md, plots/<scorer>.png and contact_sheet.png. Interrupted, the same command continues:
images and scores already written are kept (each is written whole, by rename), and a model whose file or
definition changed since its images were made is refused rather than mixed.
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import logging
import os
from pathlib import Path

from ...mole_ops.atomic import replacing, write_text
from ..training.config import ConfigError, read_text
from ..training.progress import bar
from . import models as model_list
from . import scorers as scoring
from . import summary as summary_mod

log = logging.getLogger("mole.evaluate")
SCORERS = ("hps", "imagereward", "clip")
COLUMNS = ("model", "repeat", "prompt_id", "seed", "prompt", "image")
JUDGE_FILE = Path(__file__).resolve().parents[1] / "demo" / "world_judge.safetensors"
QUEUED_AHEAD = 2      # graphs queued in the server beyond the one awaited (generate)
CHUNK = 8            # images per scoring batch; batches sit at fixed positions so a resumed run scores alike


def read_prompts(path: Path, limit: int | None) -> tuple[list[dict], str]:
    """The rows of a prompts.csv (a folder means its prompts.csv), and the benchmark's name."""
    path = Path(path)
    if path.is_dir():
        path = path / "prompts.csv"
    try:
        rows = list(csv.DictReader(io.StringIO(read_text(path, "--prompts"), newline="")))
    except csv.Error as e:
        raise ConfigError(f"--prompts {path}: not a valid CSV file ({e})") from e
    if not rows:
        raise ConfigError(f"--prompts {path}: no prompt rows (make one with `python -m trainer prompts`)")
    missing = {"repeat", "prompt_id", "seed", "prompt"} - set(rows[0])
    if missing:
        raise ConfigError(f"--prompts {path}: missing columns {sorted(missing)} (expected repeat, prompt_id, seed, "
                          "prompt)")
    out = []
    for i, r in enumerate(rows, start=2):
        try:
            out.append({"repeat": int(r["repeat"]), "prompt_id": int(r["prompt_id"]), "seed": int(r["seed"]),
                        "prompt": r["prompt"]})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--prompts {path}: line {i}: repeat, prompt_id and seed must be integers") from e
        if not str(r["prompt"] or "").strip():
            raise ConfigError(f"--prompts {path}: line {i}: empty prompt")
    if limit:
        counts: dict[int, int] = {}
        kept = []
        for r in out:
            counts[r["repeat"]] = counts.get(r["repeat"], 0) + 1
            if counts[r["repeat"]] <= limit:
                kept.append(r)
        out = kept
    report = path.parent / "prompts_report.json"
    name = path.parent.name
    if report.is_file():
        try:
            name = json.loads(report.read_text()).get("benchmark", name)
        except json.JSONDecodeError:
            pass
    return out, name


def image_name(row: dict) -> str:
    return f"r{row['repeat']}-p{row['prompt_id']}-s{row['seed']}.png"


def settings_of(args) -> dict:
    sampler = model_list.shipped_sampler()
    for key in ("steps", "cfg", "sampler_name", "scheduler"):
        if getattr(args, key) is not None:
            sampler[key] = getattr(args, key)
    return {"width": args.width, "height": args.height, "negative": args.negative, "sampler": sampler}


def claim_folders(out: Path, models: list, settings: dict) -> None:
    """Each model's image folder records what made its images; a different model or setting is refused."""
    for m in models:
        folder = out / "images" / m.slug
        folder.mkdir(parents=True, exist_ok=True)
        stamp = folder / "model.json"
        mine = model_list.fingerprint(m, settings)
        if stamp.exists() and stamp.read_text() != mine:
            raise ConfigError(f"{stamp}: the images of model {m.name!r} in {folder} were made with another "
                              f"definition, file or setting; use another --output_dir or delete {folder}")
        if not stamp.exists():
            write_text(stamp, mine)


def generate(out: Path, specs: model_list.ModelList, rows: list[dict], settings: dict, device: str) -> dict:
    """Make every missing image; returns {model name: error} for models that failed (the others go on).

    Model by model, and a model's images of one prompt one after the other, so that the server's cache encodes each
    prompt once per model; QUEUED_AHEAD graphs wait in the server's queue while one is awaited, so that the sampler
    never idles between images (each image depends on its graph alone: the order changes no picture)."""
    first = {}
    for r in rows:
        first.setdefault(r["prompt"], len(first))
    ordered = sorted(rows, key=lambda r: first[r["prompt"]])
    todo = [(m, r) for m in specs.models for r in ordered if not (out / "images" / m.slug / image_name(r)).exists()]
    failed: dict[str, str] = {}
    if not todo:
        return failed
    from ..harness.comfy_server import ComfyServer, ServerError, prepare_base_dir

    names = model_list.server_names(specs.models)
    base = out / "comfyui"
    for path, (folder, name) in names.items():
        dest = base / "models" / folder / name
        if dest.is_symlink() and dest.resolve() != path:
            dest.unlink()
        if not dest.is_symlink():
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, dest)
    prepare_base_dir(base)

    def fail(m, e: ServerError) -> None:
        if server.proc is None or server.proc.poll() is not None:
            raise e                                         # the server itself died: nothing more can be made
        if m.name not in failed:
            failed[m.name] = f"model {m.name!r} ({', '.join(str(p) for p in m.files)}): {e.summary()}"
            log.error("%s; its other images are skipped", failed[m.name])

    def collect(m, r, prompt_id: str) -> None:
        try:
            made = server.output_files(server.wait(prompt_id, timeout=3600)["outputs"])
        except ServerError as e:
            fail(m, e)
        else:
            if m.name not in failed:
                os.replace(made[0], out / "images" / m.slug / image_name(r))
        progress.update(1)

    pending: collections.deque = collections.deque()
    with ComfyServer(base, cpu=device == "cpu") as server, \
            bar(total=len(todo), desc="images", unit="img") as progress:
        for m, r in todo:
            if m.name in failed:
                progress.update(1)
                continue
            api = model_list.graph(m, names, r["prompt"], settings["negative"], r["seed"], settings["width"],
                                   settings["height"], settings["sampler"], prefix=f"eval_{m.slug}")
            try:
                pending.append((m, r, server.queue(api)))
            except ServerError as e:                       # refused when queued (the graph does not validate)
                fail(m, e)
                progress.update(1)
            while len(pending) > QUEUED_AHEAD:
                collect(*pending.popleft())
        while pending:
            collect(*pending.popleft())
    return failed


def check_scorers(makers: list, columns: list[str]) -> None:
    """Load every scorer once (and let it go): its files are the right model before any image is made."""
    for column, make in zip(columns, makers):
        log.info("checking the %s scorer's files", column)
        make().close()


def read_scores(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = [{**r, **{k: int(r[k]) for k in ("repeat", "prompt_id", "seed")}} for r in csv.DictReader(f)]
    return {(r["model"], r["repeat"], r["prompt_id"], r["seed"]): r for r in rows}


def write_scores(path: Path, table: list[dict], columns: list[str]) -> None:
    with replacing(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, list(COLUMNS) + columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(table)


def score(out: Path, table: list[dict], makers: list, columns: list[str]) -> None:
    """Fill the missing score columns of `table` (rows in a fixed order), writing scores.csv after every batch."""
    path = out / "scores.csv"
    for column, make in zip(columns, makers):
        chunks = [table[i:i + CHUNK] for i in range(0, len(table), CHUNK)]
        todo = [c for c in chunks if any(r.get(column) in (None, "") for r in c)]
        if not todo:
            continue
        scorer = make()
        try:
            with bar(total=sum(len(c) for c in todo), desc=column, unit="img") as progress:
                for chunk in todo:
                    values = scorer.score([(out / r["image"], r["prompt"]) for r in chunk])
                    for r, v in zip(chunk, values):
                        r[column] = repr(float(v))
                    write_scores(path, table, columns)
                    progress.update(len(chunk))
        finally:
            scorer.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = model_list.__doc__
    parser.add_argument("--prompts", type=Path, help="prompts.csv of `python -m trainer prompts` (or its folder)")
    parser.add_argument("--models", type=Path, required=True, help="TOML file of the models to compare (below)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--limit", type=int, help="only the first N prompts of each repeat (a quick run)")
    g = parser.add_argument_group("scorers (local files; nothing is downloaded)")
    g.add_argument("--hps", type=Path, help="HPS v2 checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)")
    g.add_argument("--hps_arch", default="ViT-H-14", help="its open_clip architecture: a name or a config JSON")
    g.add_argument("--imagereward", type=Path, help="ImageReward.pt")
    g.add_argument("--imagereward_config", type=Path, help="ImageReward's med_config.json")
    g.add_argument("--imagereward_tokenizer", type=Path, help="folder of bert-base-uncased's tokenizer (vocab.txt);"
                   " default: the Hugging Face cache")
    g.add_argument("--imagereward_python", type=Path, default=scoring.DEFAULT_IMAGEREWARD_PYTHON,
                   help="Python of ImageReward's own environment (default: .venv-imagereward, which "
                   "scripts/imagereward-env.sh builds)")
    g.add_argument("--clip", type=Path, help="CLIP for the CLIP-score column: a Hugging Face CLIP folder or an "
                   "open_clip checkpoint file (with --clip_arch)")
    g.add_argument("--clip_arch", default="ViT-L-14", help="open_clip architecture of a --clip checkpoint file")
    g.add_argument("--world_judge", type=Path, nargs="?", const=JUDGE_FILE, help="the demo world's judge (its "
                   "pictures only): person, face and hand found, face and hand detail; default: the shipped "
                   "file")
    s = parser.add_argument_group("generation (default: the shipped txt2img workflow's settings)")
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--height", type=int, default=512)
    s.add_argument("--steps", type=int)
    s.add_argument("--cfg", type=float)
    s.add_argument("--sampler_name")
    s.add_argument("--scheduler")
    s.add_argument("--negative", help="negative prompt (default: the shipped workflow's)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    w = parser.add_argument_group("in-world scorer, instead of --prompts: held-out denoising loss per region "
                                  "(benchmarks/heldout.py)")
    w.add_argument("--heldout", type=Path, help="folder of held-out images with caption files (.caption)")
    w.add_argument("--masks", type=Path, help="their region masks, <image stem>_<region>.png (face, hand, ...)")
    w.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise seeds: the repeats")
    parser.set_defaults(run=run)


def heldout_evaluation(specs: model_list.ModelList, images: Path, masks: Path, seeds: list[int], out: Path,
                       device: str = "cpu", benchmark: str | None = None) -> dict:
    """The in-world evaluation: every model's held-out loss per region (benchmarks/heldout.py), summarised as the
    image scores are. scores.csv is written after each model; a model whose rows are all there is not measured
    again, so a second call on the same folder only summarises."""
    from ..harness.host import use_comfy
    from . import heldout

    pictures = heldout.read_pictures(images, masks)
    use_comfy(cpu=device == "cpu")
    out.mkdir(parents=True, exist_ok=True)
    columns = heldout.columns(pictures)
    path = out / "scores.csv"
    stamp = out / "heldout.json"
    mine = json.dumps({"models": [m.describe() for m in specs.models], "images": str(images),
                       "pictures": len(pictures), "seeds": seeds}, sort_keys=True)
    if stamp.exists() and stamp.read_text() != mine:
        raise ConfigError(f"{stamp}: {out} holds an evaluation of other models, pictures or seeds; use another "
                          "--output_dir or delete it")
    write_text(stamp, mine)
    done = read_scores(path)
    table, cache = [], {}
    with bar(total=len(specs.models), desc="models", unit="model") as progress:
        for m in specs.models:
            have = [done.get((m.name, i, j, s)) for i, s in enumerate(seeds) for j in range(len(pictures))]
            table += have if all(have) else heldout.score_model(m, pictures, seeds, cache)
            write_scores(path, table, columns)
            progress.update(1)
    cache.clear()
    return summary_mod.write(table, [m.name for m in specs.models], columns, specs.reference,
                             benchmark or f"held-out pictures of {images}", out)


def run_heldout(args: argparse.Namespace) -> int:
    if args.masks is None:
        raise ConfigError("--heldout needs --masks (region masks <image stem>_<region>.png)")
    if args.hps or args.imagereward or args.clip or args.world_judge:
        raise ConfigError("--hps, --imagereward, --clip and --world_judge score generated images; --heldout "
                          "measures denoising loss on held-out pictures instead: give one or the other")
    specs = model_list.load(args.models)
    summary = heldout_evaluation(specs, args.heldout, args.masks, args.seeds, args.output_dir,
                                 scoring.pick_device(args.device))
    print(summary_mod.markdown(summary))
    print(f"\nwrote {args.output_dir / 'summary.md'}, {args.output_dir / 'scores.csv'}, {args.output_dir / 'plots'}")
    return 0


def run(args: argparse.Namespace) -> int:
    if (args.prompts is None) == (args.heldout is None):
        raise ConfigError("give --prompts (generate and score images) or --heldout with --masks (the in-world "
                          "scorer: held-out denoising loss per region), not both")
    if args.heldout is not None:
        return run_heldout(args)
    if args.negative is None:
        from ..harness.workflows import NEGATIVE
        args.negative = NEGATIVE
    rows, benchmark = read_prompts(args.prompts, args.limit)
    specs = model_list.load(args.models)
    scoring.check_files(args)
    device = scoring.pick_device(args.device)
    out = args.output_dir
    settings = settings_of(args)
    claim_folders(out, specs.models, settings)
    columns = [c for c, given in zip(SCORERS, (args.hps, args.imagereward, args.clip)) if given]
    columns += list(scoring.WORLD_JUDGE_COLUMNS) if args.world_judge else []
    makers = scoring.from_args(args, device)
    if any(not (out / "images" / m.slug / image_name(r)).exists() for m in specs.models for r in rows):
        check_scorers(makers, columns)             # a wrong scorer file must not wait for a night of sampling
    failed = generate(out, specs, rows, settings, device)
    done = read_scores(out / "scores.csv")
    table = []
    for m in specs.models:
        if m.name in failed:
            continue
        for r in rows:
            key = (m.name, r["repeat"], r["prompt_id"], r["seed"])
            old = done.get(key, {})
            table.append({"model": m.name, **r, "image": f"images/{m.slug}/{image_name(r)}",
                          **{c: old.get(c, "") for c in columns}})
    score(out, table, makers, columns)
    for r in table:
        r["path"] = out / r["image"]
    names = [m.name for m in specs.models if m.name not in failed]
    reference = specs.reference if specs.reference in names else names[0] if names else None
    if reference is None:
        raise ConfigError("no model made its images:\n" + "\n".join(failed.values()))
    summary = summary_mod.write(table, names, columns, reference, benchmark, out)
    print(summary_mod.markdown(summary))
    print(f"\nwrote {out / 'summary.md'}, {out / 'scores.csv'}, {out / 'plots'}, {out / 'contact_sheet.png'}")
    if failed:
        print("\nFAILED (left out of the tables):\n" + "\n".join(failed.values()))
        return 1
    return 0
