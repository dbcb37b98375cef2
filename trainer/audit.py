"""Prompt audit with EMoE: score every prompt of a file by the first-step disagreement of an ensemble, then
rank them into quartiles and compare groups (languages, demographics...), as the EMoE paper does.

    python -m trainer audit --pretrained_model_name_or_path base.safetensors --member_loras a.safetensors b.safetensors \\
        --prompts prompts.csv --output_dir audit

Prompts: a text file (one per line) or a CSV with a `prompt` column and optional `group` and `quality` columns.
Members: the base plus each `--member_loras` file applied to it, and/or `--member_checkpoints`; or `--experts`
(MoLE experts on the base, one batched pass: "expert disagreement", not epistemic uncertainty).
Writes scores.csv (appended 25 prompts at a time: an interrupted audit resumes where it stopped), summary.json,
histogram.png and groups.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
from pathlib import Path

import torch

from ..mole_ops.emoe import DISAGREEMENT, EPISTEMIC, MemberBatch, disagreement, first_step_features
from ..mole_ops.errors import MoLEError
from ..mole_ops.plots import bars, histogram, save_png
from .training.config import ConfigError

log = logging.getLogger("mole.audit")
FIELDS = ["index", "prompt", "group", "quality", "score"]
CHUNK = 25   # prompts scored member by member, then written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="the base checkpoint")
    parser.add_argument("--member_loras", nargs="*", default=[], help="LoRA files: base + each is one member")
    parser.add_argument("--member_checkpoints", nargs="*", default=[], help="more checkpoints of the same "
                        "architecture, each one member")
    parser.add_argument("--experts", nargs="*", default=[], help="role=path MoLE experts as members (expert "
                        "disagreement; excludes the other member options)")
    parser.add_argument("--prompts", required=True, type=Path, help="prompt file (.txt or .csv)")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--resolution", type=int, default=512, help="image size whose latent is scored")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared starting noise")
    parser.set_defaults(run=run)


def read_prompts(path: Path) -> list[dict]:
    if not path.exists():
        raise ConfigError(f"--prompts {path}: no such file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "prompt" not in rows[0]:
            raise ConfigError(f"{path}: a CSV needs a 'prompt' column (optional: group, quality)")
        out = [{"prompt": r["prompt"].strip(), "group": (r.get("group") or "").strip(),
                "quality": (r.get("quality") or "").strip()} for r in rows]
    else:
        out = [{"prompt": line.strip(), "group": "", "quality": ""} for line in path.read_text().splitlines()]
    out = [r for r in out if r["prompt"]]
    if not out:
        raise ConfigError(f"{path}: no prompts")
    return out


class Scorer:
    """Loads the ensemble once; `score(prompt)` -> float (mean disagreement at the first step)."""

    def __init__(self, args: argparse.Namespace):
        import comfy.sd
        import comfy.utils

        from .training.model import Base

        self.base = Base(args.pretrained_model_name_or_path)
        self.size = args.resolution
        self.seed = args.seed
        self.experts = None
        if args.experts:
            if args.member_loras or args.member_checkpoints:
                raise ConfigError("--experts excludes --member_loras and --member_checkpoints")
            from ..mole_ops import expert_file
            from ..mole_ops.mixture import build

            loaded = [expert_file.load(p, n) for n, p in (e.split("=", 1) for e in args.experts)]
            self.experts = build(loaded, None, self.base.layout)
            self.kind = DISAGREEMENT
            return
        self.kind = EPISTEMIC
        self.members = [self.base.patcher]
        for path in args.member_loras:
            lora = comfy.utils.load_torch_file(path, safe_load=True)
            self.members.append(comfy.sd.load_lora_for_models(self.base.patcher, None, lora, 1.0, 0.0)[0])
        for path in args.member_checkpoints:
            self.members.append(Base(path).patcher)
        if len(self.members) < 2:
            raise ConfigError("give at least one of --member_loras / --member_checkpoints (or --experts)")
        if len(self.members) < 4:
            log.warning("an ensemble of %d members gives a noisy estimate; the paper used 4", len(self.members))

    def scores(self, prompts: list[str]) -> list[float]:
        """Scores of several prompts; member by member (switching members re-patches weights: do it rarely)."""
        import comfy.sample

        from ..mole_ops.hooks import HookState, attached
        from ..mole_ops.ops import GateSettings

        positives = []
        for prompt in prompts:
            cond, pooled = self.base.clip.encode_from_tokens(self.base.clip.tokenize(prompt), return_pooled=True)
            positives.append([[cond, {"pooled_output": pooled}]])
        noise = comfy.sample.prepare_noise(torch.zeros(1, 4, self.size // 8, self.size // 8), self.seed)
        if self.experts is None:
            features = torch.stack([torch.stack([first_step_features(m, p, noise, self.seed) for p in positives])
                                    for m in self.members])                          # (M, P, 1, C, H, W)
        else:
            members = MemberBatch(len(self.experts.order), 1)
            with attached(self.base.model, self.experts, HookState(GateSettings("none"), rows=members.rows)):
                features = torch.stack([members.split(first_step_features(self.base.patcher, p,
                                                                          members.repeat(noise), self.seed))
                                        for p in positives], dim=1)                  # (M, P, 1, C, H, W)
        return [float(disagreement(features[:, i], self.kind).score[0]) for i in range(len(prompts))]


def _done(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {int(r["index"]): r for r in csv.DictReader(f)}


def summarise(rows: list[dict]) -> dict:
    """Quartile edges and, per group: count, mean score, share of each score quartile, and the correlation of
    score and quality where a quality column was given."""
    scores = [float(r["score"]) for r in rows]
    edges = statistics.quantiles(scores, n=4) if len(scores) >= 4 else [min(scores)] * 3
    for r in rows:
        r["quartile"] = 1 + sum(float(r["score"]) > e for e in edges)
    groups = {}
    for name in sorted({r["group"] for r in rows}):
        members = [r for r in rows if r["group"] == name]
        values = [float(r["score"]) for r in members]
        stats = {"count": len(members), "mean": statistics.fmean(values),
                 "sem": statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0,
                 "quartile_share": {q: sum(r["quartile"] == q for r in members) / len(members) for q in (1, 2, 3, 4)}}
        quality = [(float(r["score"]), float(r["quality"])) for r in members if r["quality"]]
        if len(quality) > 2 and len({q for _, q in quality}) > 1 and len({s for s, _ in quality}) > 1:
            stats["corr_score_quality"] = statistics.correlation([s for s, _ in quality], [q for _, q in quality])
        groups[name or "(all)"] = stats
    return {"prompts": len(rows), "quartile_edges": edges, "mean": statistics.fmean(scores), "groups": groups}


def run(args: argparse.Namespace) -> int:
    from .training.progress import bar

    from .harness.host import use_comfy

    prompts = read_prompts(args.prompts)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    table = out / "scores.csv"
    done = _done(table)
    if done:
        if any(done[i]["prompt"] != prompts[i]["prompt"] for i in done if i < len(prompts)):
            raise MoLEError(f"{table} holds scores of another prompt file; use another --output_dir")
        log.info("resuming: %d of %d prompts already scored", len(done), len(prompts))
    use_comfy()
    scorer = Scorer(args)
    new = not table.exists()
    with open(table, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        todo = [i for i in range(len(prompts)) if i not in done]
        with bar(total=len(prompts), initial=len(prompts) - len(todo), desc=f"scoring ({scorer.kind})",
                  unit="prompt") as shown:
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start:start + CHUNK]
                for i, value in zip(chunk, scorer.scores([prompts[i]["prompt"] for i in chunk])):
                    writer.writerow({"index": i, **prompts[i], "score": f"{value:.6g}"})
                f.flush()              # a killed audit keeps every finished chunk
                shown.update(len(chunk))
    rows = list(_done(table).values())
    summary = {"kind": scorer.kind, **summarise(rows)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(out / "scores_ranked.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS + ["quartile"])
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: -float(r["score"])))
    save_png(histogram([float(r["score"]) for r in rows], title=f"{scorer.kind} per prompt",
                       xlabel="score (mean variance across members)", marks=summary["quartile_edges"]),
             str(out / "histogram.png"))
    groups = summary["groups"]
    save_png(bars({g: s["mean"] for g, s in groups.items()}, {g: s["sem"] for g, s in groups.items()},
                  title=f"mean {scorer.kind} per group (± s.e.)", ylabel="score"), str(out / "groups.png"))
    log.info("audit of %d prompts: %s", len(rows), out)
    return 0
