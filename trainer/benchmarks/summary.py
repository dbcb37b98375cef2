"""An evaluation's tables and pictures from its per-image scores (scores.csv):

- per model and scorer, the mean over the repeats' means +- their standard error (the paper's Tables 1-3; with one
  repeat, the standard error over prompts, said so in the table);
- the paired difference to the reference model (same prompt, same seed) with a 95% bootstrap interval over the
  pairs, and the win rate (share of pairs where the model scores higher; ties count half);
- plots/<scorer>.png: score distributions per model and the paired differences with their intervals;
- contact_sheet.png: the first prompts side by side across the models.
"""
from __future__ import annotations

import json
import math
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

from ...mole_ops.atomic import replacing, write_text

BOOTSTRAP = 2000


def lower_is_better(scorer: str) -> bool:
    """Losses (the in-world scorer's columns) are better low; every image score is better high."""
    return scorer == "loss" or scorer.startswith("loss_")


def _values(rows: list[dict], scorer: str, model: str) -> dict[tuple, float]:
    values = {(r["repeat"], r["prompt_id"], r["seed"]): float(r[scorer]) for r in rows
              if r["model"] == model and r.get(scorer) not in (None, "")}
    return {k: v for k, v in values.items() if not math.isnan(v)}


def stats(rows: list[dict], scorer: str, model: str, reference: str, seed: int = 0) -> dict:
    """The figures of one model under one scorer (see the module docstring). Rows without a value for the scorer
    (a picture without that region, a detail score where the judge found no such part) are left out."""
    mine, ref = _values(rows, scorer, model), _values(rows, scorer, reference)
    by_repeat = defaultdict(list)
    for (repeat, _, _), value in mine.items():
        by_repeat[repeat].append(value)
    means = np.array([np.mean(v) for _, v in sorted(by_repeat.items())])
    values = np.array(list(mine.values()))
    if len(means) > 1:
        se, over = float(means.std(ddof=1) / math.sqrt(len(means))), "repeats"
    else:
        se, over = (float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")), "prompts"
    keys = sorted(set(mine) & set(ref))
    diff = np.array([mine[k] - ref[k] for k in keys])
    out = {"mean": float(means.mean()), "se": se, "se_over": over, "images": len(values), "repeats": len(means)}
    if len(diff):
        rng = np.random.default_rng(seed)
        boot = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(axis=1)
        out["vs_reference"] = {"mean": float(diff.mean()), "ci95": [float(np.percentile(boot, 2.5)),
                                                                     float(np.percentile(boot, 97.5))],
                               "win_rate": float(((diff < 0 if lower_is_better(scorer) else diff > 0).sum()
                                                  + 0.5 * (diff == 0).sum()) / len(diff)),
                               "pairs": len(diff)}
    return out


def summarise(rows: list[dict], models: list[str], scorers: list[str], reference: str, benchmark: str) -> dict:
    return {"benchmark": benchmark, "reference": reference, "scorers": scorers, "images": len(rows),
            "models": {m: {s: stats(rows, s, m, reference) for s in scorers} for m in models}}


LABELS = {"hps": "HPS v2 (100 x cosine)", "imagereward": "ImageReward", "clip": "CLIP score (100 x cosine)",
          "loss": "held-out denoising loss, all cells (lower is better)",
          "all_found": "world judge: a person with a face and a hand found (share of pictures)",
          "person_found": "world judge: person found (share of pictures)",
          "face_found": "world judge: face found (share of pictures)",
          "hand_found": "world judge: hand found (share of pictures)",
          "face_detail": "world judge: face detail, where a face is found (0-1)",
          "hand_detail": "world judge: hand detail, where a hand is found (0-1)"}


def label(scorer: str) -> str:
    if scorer.startswith("loss_"):
        return f"held-out denoising loss, {scorer[5:]} cells (lower is better)"
    return LABELS.get(scorer, scorer)


def markdown(summary: dict) -> str:
    lines = [f"# Evaluation: {summary['benchmark']}", "",
             f"{summary['images']} rows. Reference: {summary['reference']}. Mean +- standard error over the "
             "repeats' means; the difference to the reference is paired (same prompt or picture, same seed) with a "
             "95% bootstrap interval; win rate: share of pairs in which the model does better (a higher score, a "
             "lower loss; ties count half).", ""]
    for scorer in summary["scorers"]:
        digits = 4 if lower_is_better(scorer) else 3
        lines += [f"## {label(scorer)}", "", "| model | mean +- s.e. | vs reference [95% CI] | win rate "
                  "| n |", "|---|---|---|---|---|"]
        for model, by in summary["models"].items():
            s = by[scorer]
            se = f"{s['mean']:.{digits}f} +- {s['se']:.{digits}f}" + (" (over prompts: 1 repeat)"
                                                                       if s["se_over"] == "prompts" else "")
            v = s.get("vs_reference")
            diff = (f"{v['mean']:+.{digits}f} [{v['ci95'][0]:+.{digits}f}, {v['ci95'][1]:+.{digits}f}]"
                    if v else "-")
            win = f"{v['win_rate']:.2f}" if v else "-"
            lines.append(f"| {model} | {se} | {diff} | {win} | {s['images']} |")
        lines.append("")
    return "\n".join(lines)


def plots(rows: list[dict], summary: dict, folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    models = list(summary["models"])
    made = []
    for scorer in summary["scorers"]:
        fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(models), 4.2))
        data = [list(_values(rows, scorer, m).values()) for m in models]
        left.boxplot(data, showmeans=True)
        left.set_xticks(range(1, len(models) + 1), [textwrap.fill(m, 14) for m in models], fontsize=8)
        left.set_title(textwrap.fill(f"{label(scorer)} per image", 50), fontsize=9)
        diffs = [summary["models"][m][scorer].get("vs_reference") for m in models]
        for i, d in enumerate(diffs):
            if d:
                right.errorbar([i], [d["mean"]], yerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]],
                               fmt="o", capsize=4)
        right.axhline(0, color="grey", lw=0.8)
        right.set_xticks(range(len(models)), [textwrap.fill(m, 14) for m in models], fontsize=8)
        right.set_title(textwrap.fill(f"paired difference to {summary['reference']} (95% CI)", 50), fontsize=9)
        right.set_xlim(-0.5, len(models) - 0.5)
        fig.tight_layout()
        path = folder / f"{scorer}.png"
        with replacing(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        made.append(path)
    return made


def contact_sheet(rows: list[dict], models: list[str], path: Path, prompts: int = 4) -> Path | None:
    """The first `prompts` prompts of the first repeat (rows) across the models (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    firsts = []
    for r in rows:
        key = (r["repeat"], r["prompt_id"], r["seed"])
        if key not in firsts:
            firsts.append(key)
    firsts = sorted(firsts)[:prompts]
    if not firsts:
        return None
    images = {(r["model"], (r["repeat"], r["prompt_id"], r["seed"])): r for r in rows}
    fig, axes = plt.subplots(len(firsts), len(models), figsize=(2.4 * len(models), 2.7 * len(firsts)),
                             squeeze=False)
    for i, key in enumerate(firsts):
        for j, model in enumerate(models):
            ax = axes[i][j]
            ax.axis("off")
            row = images.get((model, key))
            if row is None:
                continue
            with Image.open(row["path"]) as image:
                ax.imshow(image.convert("RGB"))
            if i == 0:
                ax.set_title(textwrap.fill(model, 24), fontsize=9)
            if j == 0:
                ax.text(0, -0.02, textwrap.fill(row["prompt"], 40), transform=ax.transAxes, fontsize=7, va="top")
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write(rows: list[dict], models: list[str], scorers: list[str], reference: str, benchmark: str,
          folder: Path) -> dict:
    summary = summarise(rows, models, scorers, reference, benchmark)
    write_text(folder / "summary.json", json.dumps(summary, indent=1))
    write_text(folder / "summary.md", markdown(summary) + "\n")
    plots(rows, summary, folder / "plots")
    if not any(lower_is_better(s) for s in scorers):        # held-out pictures are the same for every model
        contact_sheet(rows, models, folder / "contact_sheet.png")
    return summary
