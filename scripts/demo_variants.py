"""The demo's variant studies (issue 17): recipes tried on a validation split, never on the demo's held-out sets.

    .venv/bin/python scripts/demo_variants.py stage1  --demo D --seed S
    .venv/bin/python scripts/demo_variants.py experts --demo D --seed S --output_dir X [--variants A ... Aa4]
    .venv/bin/python scripts/demo_variants.py gates   --demo D --seed S --experts X/A --output_dir G [--variants ...]

`stage1` builds the world, the base and stage 1 of a demo folder and stops there (nothing held-out is
measured). `experts` and `gates` train variants on that stage 1 and print a markdown table of their measures.
Validation pictures come from the world's own drawing under the streams "<set>:<20000 + seed>" (the demo's training
sets use <seed>, its held-out sets <10000 + seed>), 48 per set.

Protocol of `experts` (fixed before any variant was measured, 2026-11-30): which expert recipe satisfies the
precondition for gates (SPEC.md section 7)?
- Measure: expert-effect (each expert alone at scale 1 against stage 1, t = 800, 500, 200, fixed noise seeded with
  the world seed) on the validation scenes; the verdict per expert is the one the demo reports (own region's delta
  the smallest on the mean over timesteps); margin = smallest (other region's delta - own delta) on that mean.
- Variants (everything else as the demo: rank 16, 200 steps, lr 1e-3, weight decay 0.01, seed + 1):
  A  the demo's: detailed scenes and close-ups of the part, the loss masked to the part;
  B  close-ups of the part only, the loss masked to the part;
  C  scenes in which only the expert's part is detailed (the other drawn plain, as stage 1 learned it) and
     close-ups, the loss masked to the part;
  D  the scenes of C with the loss on the whole picture (no mask), close-ups masked to the part;
  P  a control with nothing new to learn: stage 1's own plain scenes, the loss masked to the part (what 200 more
     steps of training do by themselves, added 2026-11-30 after A failed in world versions 2-4).
- Rule: a variant qualifies when both experts pass on both seeds (0 and 1); among qualifying variants the largest
  smallest margin wins. If none qualifies, the demo keeps A and its report says so.

Protocol of the VAE change (fixed 2026-12-01, before any model was trained with it): the world's VAE becomes the
shipped one (`python -m trainer world-vae`: 6000 steps once instead of 400 per demo run), adopted on its validation
PSNR alone (the readability goal). The world stays version 3. With it, `stage1` and `experts --variants A` run on
seeds 0 and 1 and are reported as they come; the demo keeps recipe A unless it fails, and then D (world 2's best)
is measured under the rule above.

Protocol of `gates` (fixed before any gate variant was measured, 2026-11-30): on which data do gates learn content?
- Variants (everything else as the demo: 300 steps, lr 1e-3, seed + 2, plain eps-MSE):
  G1 the demo's: the detailed scenes;
  G2 the detailed scenes and the face and hand close-ups (a sample-level gate can only learn "this picture is a
     close-up of a face" from pictures that differ in that way; every scene holds both parts).
- Measures (the demo's evidence) on the validation scenes and close-ups: identity AUC (best of t = 800, 500, 200
  and their mean); own-mask minus other-mask AUC of each expert's map (mean over timesteps); global gate of the
  matching expert minus the other's on each part's close-ups.
- Rule: G2 is adopted when, averaged over seeds 0 and 1, it is higher than G1 on at least 3 of these 4 measures
  (identity, face own-other, hand own-other, the smaller global difference).
- Repeated with the world VAE (fixed 2026-12-01 before its first number): the same variants, measures and rule,
  with the experts of `experts --variants A` trained with it (which pass the precondition on both seeds); if G2
  qualifies now, the demo adopts it.
- More gate steps (fixed 2026-12-01 before its first number): does what the gates learn stop at 300 steps?
  G1x2 is G1 with 600 steps, everything else the same, measured on the same validation sets with the same
  experts, under the same rule against G1. The demo adopts it only if it qualifies and its first run, host build
  included, stays within 10 minutes (600 steps add about 85 s to about 520 s); otherwise the README reports it as
  the lever it is, with its cost.
- The paper's global gate (fixed 2026-12-05 before its first number, with the world base and the experts of
  `experts --variants A`): GP is G1 with `--gate_variant paper` (SPEC.md section 3: the global gate reads the layer's
  input tokens, Linear(d_in, N), instead of each expert's output), everything else the same, measured on the same
  validation sets against G1 (re-measured with the world base), under the same rule. If it qualifies, adopting it
  in the demo (its runs on seeds 0 and 1) is a step of its own; either way docs/evidence.md reports both.
  Outcome (2026-12-05): averaged over seeds 0 and 1, GP is higher on identity (0.849 against 0.845), the face map
  (+0.090 against +0.080) and the hand map (+0.102 against +0.101), and lower on the smaller global difference
  (-0.102 against -0.009: its face gate is above its hand gate on both kinds of close-up): it qualifies by the
  rule, by small margins, and the demo adopts it (Recipe.gate_variant).

Protocol of the world base (issue 26, fixed 2026-12-04 before any sample of it was looked at): does a base
pretrained once on plain scenes generate people?
- The base: the detectable one-level UNet (harness/tiny_models.DETECTABLE_SD15, 18.7M parameters), trained by
  `python -m trainer world-base` (its RECIPE: 2048 plain scenes of stream 30000, 1600 steps of batch 16, lr 5e-4
  cosine, caption dropout 0.1, fp32). A lower level with attention was not tried first: one variant costs about
  40 minutes of training here, and this one is measured before any other is built.
- Measure: the demo's generation table (results/generation: 12 scene captions of stream "generation:<seed>" x 2
  seeds, the shipped txt2img graph at 64 px, 20 DDIM steps, CFG 7.5, empty negative prompt), the judge's
  `all_found` on stage 1, demo seeds 0 and 1; and the judge's accuracy on held-out renders.
- Rule: adopted as the demo's starting point when stage 1 reaches all_found >= 0.9 on both seeds and a first
  `make demo` on a bare clone stays within 10 minutes; otherwise the demo keeps it only if it is still better
  than the random base on all_found, and the README says so.

Protocol of the sampler settings (issue 26, fixed 2026-12-04 before any picture of it was made): stage 1 drew a
person with a face and a hand in 0.75 / 0.88 of its samples at the shipped 20 DDIM steps and CFG 7.5, the misses
mostly garbled figures; does another guidance scale or step count draw people more often, and can the demo sample
with fewer steps (its generation table is 362 s of a 918 s run)?
- Settings: DDIM with the ddim_uniform schedule, steps {10, 20} x CFG {3, 5, 7.5}, 64 px, empty negative prompt.
- Measure: the judge's all_found on stage 1 of demo seeds 0 and 1, on validation prompts: 24 scene captions of the
  stream "generation-validation:<seed>" with one noise seed each (90000 + 1000 seed + i; the demo's generation
  table uses "generation:<seed>" and seeds below 20000), through `evaluate --world_judge` (the real server and the
  shipped txt2img graph). Face and hand found and detail are reported with it.
- Rule: the best setting has the highest all_found over the 48 pictures of both seeds; settings within 2/48 of it
  count as tied, and among tied settings the fewest steps wins, then the CFG nearest 7.5. The demo's pictures
  (generation table, gates while generating, its runs of the shipped workflows, the pack's recommended settings)
  adopt the winner; the shipped workflows keep their settings for real SD1.5 files.
Protocol of the cross-effect study (issue 27, fixed 2026-12-04 before its first number, with the world base): can
an expert be trained so that it does not help the other part, which content-aware gates need?
- Variants: A, C and D of `experts` above (the demo's; own part detailed in scenes with the loss masked to it; the
  same scenes with the loss on the whole picture, so the expert learns to leave the other part as stage 1 draws
  it), everything else as the demo.
- Measure: `experts --variants A C D` on the validation scenes (precondition and the cross-effect on the other
  part's cells) and on the validation face and hand close-ups as whole pictures (each expert on the other kind),
  mean over t = 800, 500, 200, 95% bootstrap intervals over pictures; demo seeds 0 and 1.
- Rule: a variant qualifies when, on both seeds, both experts pass the precondition and neither helps the other
  part's cells nor the other kind of close-up (no interval wholly below 0). If none qualifies, the demo keeps A
  and docs/evidence.md reports every variant's cross-effect. Adopting a qualifying variant in the demo (its runs
  on seeds 0 and 1) is a step of its own.

Protocol of the demo's time (issue 26, fixed 2026-12-05 before any model of it was trained): a first `make demo`
on a bare clone took about 13 minutes (host build 108 s with pip, demo 673 s on seed 0 in a fast hour: training
388 s, generation table 177 s); it should take at most 10. The host build now installs through uv (64 s; no
number changes). The rest cannot be had without changing the evidence, so one leaner recipe L is measured:
- L: stage 1 40 steps (was 150: it fine-tunes the world base on the distribution the base was pretrained on, and
  both draw people equally often: 0.917 each on seed 0), experts 100 steps each (was 200), gates 200 steps (was
  300), and the generation table without the world base's row (the issue's eight models; the base stays in the
  held-out table). Everything else as the demo: world, seeds, sampler, prompts x seeds, held-out sets.
- Measure: a first `make demo` on a bare clone (host build included, seed 0) and the demo on seed 1; their
  reports against the README's goal table of the current recipe.
- Rule: the demo adopts L when the first run takes at most 10 minutes and, on both seeds, stage 1 draws a person
  with a face and a hand in >= 0.9 of its samples, MoLE's face and hand detail over stage 1 stay above 0 (95%
  interval), and every other goal that holds today on that seed still holds. Otherwise the demo keeps its recipe
  and docs/evidence.md reports L's numbers.
- Outcome (2026-12-05): the first run took 9 min 25 s, but stage 1 drew whole people in 0.83 / 0.75 of its
  samples and the identity AUC while generating fell to 0.74 / 0.57 (seeds 0 / 1): L is not adopted
  (docs/evidence.md, "The time study").

Protocol of the contrary-detail world (issue 27, fixed 2026-12-05 before any model of it was trained): in world 3
every expert of the cross-effect study helped the other part, because a face's detail and a hand's are both dark
marks on skin, so either expert's marks lower the error on the other part too. Is an expert's effect specific in a
world where one part's detail drawn on the other is wrong?
- Variant W: the world's pictures with the hand's lines (between the fingers, over the knuckles) drawn light
  (world.LIGHT_LINES) instead of dark; everything else is the same picture from the same stream (the face, the
  silhouettes, the cuff, the plain scenes: the world base and stage 1 stay valid). The detail contrast of the hand
  (world.detail_contrast) becomes 0.059 against the face's 0.058 (dark lines: 0.041).
- Experts: recipe A (the demo's) on W's detailed scenes and close-ups, on stage 1 of demo seeds 0 and 1.
- Measure and rule: those of the cross-effect study above, on the validation scenes and close-ups drawn in W.
- If W qualifies, adopting it (a world version with light hand lines, a judge trained on it, the gates of `gates`,
  the demo on seeds 0 and 1) is a step of its own; if not, docs/evidence.md reports W's cross-effect with the rest.
- Outcome (2026-12-05): W does not qualify: the hand expert's margin doubles (+0.081 / +0.080, A: +0.038 /
  +0.034), but each expert still helps the other part's cells (3 of 4 intervals below 0) and the other kind of
  close-up (all 4).
- Follow-up (fixed after W's outcome, before the control's numbers): is the help on the other part the expert's
  detail at all? The control P of `experts` (stage 1's own plain scenes, the loss masked to the part: nothing new
  to learn) is measured with the same validation and measures (world 3, dark lines), seeds 0 and 1. If P's experts
  help the other part's cells and close-ups about as much as A's, the cross-effect is more training of skin-coloured
  parts, not the detail, and no drawing of the detail alone removes it.
- Outcome (2026-12-05): P's experts make every part's cells and both kinds of close-up worse on both seeds (+0.002
  to +0.013, every interval above 0): the help on the other part is learned from the detail (docs/evidence.md).

Protocol of the experts' scale and steps (issue 27, fixed 2026-12-05 before any model of it was trained): does the
cross-effect depend on how much an expert learns (its steps) or how much it can change (its rank, its scale
alpha/rank)? If an expert first learns what both parts' detail shares and only later what is its own, fewer or more
steps, a smaller rank or a smaller scale could leave the other part alone.
- Variants of A (everything else as the demo: world 3, dark lines, the demo's data and masks): A100 with 100 steps
  and A400 with 400 (A: 200); Ar4 with rank 4 and alpha 4 (A: rank 16, alpha 16; the scale alpha/rank stays 1);
  Aa4 with rank 16 and alpha 4 (scale 0.25: the same adapter learns a quarter as fast through AdamW's steps).
- Measure and rule: those of the cross-effect study above (validation scenes and close-ups, seeds 0 and 1); each
  variant's table row is reported with the ratio of its help on the other part to its help on its own, so that the
  trend over steps, rank and scale can be read even if none qualifies. Adopting a qualifying variant is a step of
  its own.
- Follow-up (fixed 2026-12-05 after seed 0's table of these variants, before any gate was trained on them and
  before seed 1's table was read): on seed 0 no variant qualifies, but the hand expert's help on faces falls with
  its steps (0.82, 0.48, 0.36 of its help on hands at 100, 200, 400 steps) while rank 4 or scale 0.25 raise it.
  Do gates tell the parts apart better when the experts' cross-effect is smaller? A800 (800 steps) joins the
  table, and the demo's gates (GP) are trained on the experts of A400 and of A800 of seeds 0 and 1 and measured
  against GP on A's experts with the gates' measures and rule (below). A pair that wins is adopted only if a first
  `make demo` with it still stays within 10 minutes on the host that measures it (800 steps add about 3 minutes
  here); docs/evidence.md reports every pair either way.
- Outcome (2026-12-05): A800's experts no longer help the other part's cells on seed 0 (none, both experts) but
  still do on seed 1 (0.18 of their own help), and every expert of every variant helps the other kind of close-up:
  none qualifies. Gates on them: GP on A800's experts is higher than GP on A's on identity, the face map and the
  smaller global difference (3 of 4; A400's also 3 of 4, by less), so the pair qualifies.
- Which to adopt (fixed after both studies' outcomes, before its last number): the close-ups study's rule picked
  GPlr3 (on A's experts) and this one A800 with GP; their combination was not measured. GPlr3 on A800's experts is
  measured on seeds 0 and 1; then A+GPlr3, A800+GP and A800+GPlr3 are each compared with A+GP by the gates' rule,
  and the one higher on the most measures wins, ties broken by the larger smaller global difference.
- Outcome (2026-12-05): A800+GPlr3 is higher than A+GP on all four (identity 0.891 against 0.849, face map +0.176
  against +0.091, hand map +0.119 against +0.103, smaller global difference -0.081 against -0.103; A+GPlr3 and
  A800+GP 3 of 4 each): the demo adopts it (Recipe.expert_steps 800, Recipe.gate_learning_rate 3e-3).
- Full-frame close-ups (fixed 2026-12-05 after the demo adopted A800+GPlr3, before F's first number): the issue's
  last named lever, close-ups with the loss on the whole frame as in the paper (so that an expert learns "this
  picture is a hand"), with the scenes still masked to the part. F is A800 with its close-ups unmasked. Measure and
  rule: those of the cross-effect study, against A800, seeds 0 and 1. If F qualifies, adopting it (and gates on
  it) is a step of its own.
- Outcome (2026-12-05): F does not qualify. On the other part's cells it is as A800 (none on seed 0; 0.20 and 0.27
  of the own help on seed 1), and on the other kind of close-up it helps twice as much (-0.059 / -0.064 and -0.055 /
  -0.055 against A800's -0.029 / -0.033 and -0.038 / -0.036): the loss on the whole frame teaches what the
  close-ups' frames share.

Protocol of gates on close-ups with the paper's global gate (issue 27, fixed 2026-12-05 before any of its gates was
trained): the demo's gates (GP) learn from scenes alone, each of which holds a face and a hand, so a sample-level
gate never sees a picture in which one expert matters more than the other; G2 (close-ups added) was measured only
with the official gate, which reads the experts' outputs. The paper's gate reads the input tokens, which tell a
face close-up from a hand close-up at once.
- Variants, on the world base's stage 1 and the experts of `experts --variants A` of seeds 0 and 1, measured
  against GP trained again in the same run: G2P (GP on the scenes and the face and hand close-ups), GPx2 (GP with
  600 steps), GPlr3 (GP with learning rate 3e-3 instead of 1e-3). Everything else as the demo.
- Measures and rule: those of `gates` above (identity, face own-other, hand own-other, the smaller global
  difference, on the validation sets, averaged over seeds 0 and 1). A variant qualifies when it is higher than GP
  on at least 3 of the 4; among qualifying variants, the one higher on the most measures wins, ties broken by the
  larger smaller global difference. Adopting the winner in the demo (its runs on seeds 0 and 1, within the demo's
  10 minutes on the host that measures it) is a step of its own; docs/evidence.md reports every variant either way.
- Outcome (2026-12-05): GPlr3 wins (higher on identity and both maps; GPx2 too, with a lower smaller global
  difference; G2P higher on the global difference alone); see the experts' steps follow-up above for what the
  demo adopts.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
spec = importlib.util.spec_from_file_location("comfyui_mole", ROOT / "__init__.py",
                                              submodule_search_locations=[str(ROOT)])
sys.modules["comfyui_mole"] = package = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package)

EXPERT_VARIANTS = {"A": {"scenes": True, "closeups": True}, "B": {"closeups": True},
                   "C": {"own_scenes": True, "closeups": True}, "D": {"own_scenes": False, "closeups": True},
                   "P": {"plain": True}, "W": {"scenes": True, "closeups": True},
                   **{name: {"scenes": True, "closeups": True} for name in ("A100", "A400", "A800", "Ar4", "Aa4")},
                   "F": {"scenes": True, "closeups": False}}
# what a variant changes in recipe A's training (the scale and steps study)
EXPERT_TRAINING = {"A100": {"max_train_steps": 100}, "A400": {"max_train_steps": 400},
                   "A800": {"max_train_steps": 800}, "F": {"max_train_steps": 800},
                   "Ar4": {"network_dim": 4, "network_alpha": 4.0}, "Aa4": {"network_alpha": 4.0}}
# the hand's detail lines a variant's pictures (training and validation) are drawn with (world.HAND_LINES)
HAND_LINES = {"W": "light"}
# gate variants: (training sets, steps, global-gate variant); the demo trained its gates for 300 steps until the
# gate-steps study
GATE_VARIANTS = {"G1": (("scenes",), 300, "official"), "G2": (("scenes", "faces", "hands"), 300, "official"),
                 "G1x2": (("scenes",), 600, "official"), "GP": (("scenes",), 300, "paper"),
                 "G2P": (("scenes", "faces", "hands"), 300, "paper"), "GPx2": (("scenes",), 600, "paper"),
                 "GPlr3": (("scenes",), 300, "paper")}
GATE_LEARNING_RATE = {"GPlr3": 3e-3}   # 1e-3 otherwise
CLOSEUPS = {"face": "faces", "hand": "hands"}
VALIDATION = 20_000


def save_variants(out: Path, results: dict) -> None:
    """Add a run's variants to the folder's variants.json (a later run of other variants keeps the earlier ones)."""
    path = out / "variants.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**earlier, **results}, indent=1))


def validation_set(out: Path, kind: str, seed: int, hand_lines: str = "dark") -> Path:
    from comfyui_mole.trainer.demo import world as world_module

    folder = out / "validation" / kind if hand_lines == "dark" else out / "validation" / hand_lines / kind
    if not (folder / "masks").is_dir():
        world_module.write_set(folder, kind, 48, VALIDATION + seed, 64, hand_lines=hand_lines)
    return folder


def training_set(world: Path, out: Path, kind: str, seed: int, hand_lines: str) -> Path:
    """The demo world's training set `kind`, or the same pictures (its stream) drawn with other hand lines."""
    from comfyui_mole.trainer.demo import world as world_module
    from comfyui_mole.trainer.demo.pipeline import FULL

    if hand_lines == "dark":
        return world / kind
    folder = out / "data" / hand_lines / kind
    if not (folder / "masks").is_dir():
        world_module.write_set(folder, kind, FULL.scenes if kind == "scenes" else FULL.closeups, seed, 64,
                               hand_lines=hand_lines)
    return folder


def demo_files(args) -> tuple[Path, Path]:
    """(world folder, stage-1 file) of the demo folder, checked to be of this seed."""
    world = args.demo.resolve() / "world"
    stage1 = args.demo.resolve() / "models" / "checkpoints" / "mole_sd15_stage1.safetensors"
    if json.loads((world / "world.json").read_text())["seed"] != args.seed:
        raise SystemExit(f"{args.demo} is a demo of another seed")
    return world, stage1


def stage1(args) -> int:
    from comfyui_mole.trainer.demo.pipeline import FULL, build_stage1
    from comfyui_mole.trainer.demo.world import write_world

    out = args.demo.resolve()
    world = write_world(out / "world", args.seed, 64, FULL.scenes, FULL.closeups, FULL.heldout)
    print(build_stage1(out, FULL, args.seed, world)[1])
    return 0


def experts(args) -> int:
    import torch

    from comfyui_mole.mole_ops import expert_file
    from comfyui_mole.trainer.demo import world as world_module
    from comfyui_mole.trainer.demo.pipeline import FULL, _train
    from comfyui_mole.trainer.training import expert_effect
    from comfyui_mole.trainer.training.model import Base

    out = args.output_dir.resolve()
    world, stage1_file = demo_files(args)
    for part in world_module.PARTS:
        if not (out / "data" / f"{part}_scenes").is_dir():
            world_module.write_set(out / "data" / f"{part}_scenes", f"{part}_scenes", FULL.scenes, args.seed,
                                   64)

    def validation(lines: str):
        pictures = [expert_effect.Picture(i, c, m)
                    for i, c, m in world_module.load_masks(validation_set(out, "scenes", args.seed, lines))]
        closeups = {part: expert_effect.whole_pictures([expert_effect.Picture(i, c, m) for i, c, m in
                                                        world_module.load_masks(validation_set(out, kind, args.seed,
                                                                                               lines))])
                    for part, kind in CLOSEUPS.items()}
        return pictures, closeups

    results = {}
    for name in args.variants:
        trained = {}
        (out / name).mkdir(parents=True, exist_ok=True)
        lines = HAND_LINES.get(name, "dark")
        pictures, closeups = validation(lines)
        for part in world_module.PARTS:
            folders = {"scenes": training_set(world, out, "scenes", args.seed, lines), "plain": world / "plain",
                       "own_scenes": out / "data" / f"{part}_scenes",
                       "closeups": training_set(world, out, CLOSEUPS[part], args.seed, lines)}
            subsets = {str(folders[kind]): str(folders[kind] / f"{part}_masks") if masked else None
                       for kind, masked in EXPERT_VARIANTS[name].items()}
            toml = world_module.write_dataset_toml(out / name / f"{part}.toml", subsets, 64, 8)
            recipe = {"network_dim": FULL.rank, "network_alpha": float(FULL.rank),
                      "max_train_steps": 200, **EXPERT_TRAINING.get(name, {})}   # A: the demo's until 2026-12-05
            trained[part] = _train("expert", out / name, part, stage1_file, dataset_config=str(toml),
                                   expert_name=part, masked_loss=True, learning_rate=1e-3, seed=args.seed + 1,
                                   optimizer_args=["weight_decay=0.01"], **recipe)
        closeups_file = out / name / "expert_effect_closeups.json"
        if not (out / name / "expert_effect.json").exists() or not closeups_file.exists():
            base = Base(stage1_file)
            loaded = [expert_file.load(path, role) for role, path in trained.items()]
            with torch.random.fork_rng():
                if not (out / name / "expert_effect.json").exists():
                    expert_effect.write(expert_effect.measure(base, loaded, pictures, seed=args.seed), out / name)
                by_kind = {part: expert_effect.measure(base, loaded, closeups[part], seed=args.seed)
                           for part in world_module.PARTS}
            closeups_file.write_text(json.dumps(by_kind))
        result = json.loads((out / name / "expert_effect.json").read_text())
        cross = expert_effect.cross_effects(result)
        on_closeups = expert_effect.closeup_effects(json.loads(closeups_file.read_text()))
        results[name] = {}
        for expert, by_t in result["delta"].items():
            mean = by_t["mean"]
            margin = min(v - mean[expert] for r, v in mean.items() if r != expert)
            (other, cell), = cross[expert]["parts"].items()
            shot = on_closeups[expert][other]
            results[name][expert] = {"passes": result["verdicts"][expert]["passes"], "margin": margin, **mean,
                                     "other_cells": cell, "other_closeups": shot}
    save_variants(out, results)
    print("| variant | expert | face | hand | background | passes | margin | on the other part's cells | "
          "other part / own | on the other close-ups |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, by_expert in results.items():
        for expert, r in by_expert.items():
            cells, shots = r["other_cells"], r["other_closeups"]
            print(f"| {name} | {expert} | {r['face']:+.5f} | {r['hand']:+.5f} | {r['background']:+.5f} | "
                  f"{'yes' if r['passes'] else 'no'} | {r['margin']:+.5f} | {_effect(cells)} | "
                  f"{cells['delta'] / r[expert]:.2f} | {_effect(shots)} |")
    return 0


def _effect(v: dict) -> str:
    ci = f" [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]" if v["ci95"] else ""
    return f"{v['delta']:+.4f}{ci} {v['effect']}"


def cross_effect_pick(folders: list[Path]) -> list[str]:
    """The cross-effect study's rule over the seeds' `experts` output folders: the variants that qualify."""
    runs = [json.loads((f / "variants.json").read_text()) for f in folders]
    return [name for name in runs[0] if all(
        r[name][e]["passes"] and r[name][e]["other_cells"]["effect"] != "helps"
        and r[name][e]["other_closeups"]["effect"] != "helps" for r in runs for e in r[name])]


def gates(args) -> int:
    from comfyui_mole.mole_ops import expert_file, gate_file
    from comfyui_mole.trainer.demo import evidence
    from comfyui_mole.trainer.demo import world as world_module
    from comfyui_mole.trainer.demo.pipeline import _train

    out = args.output_dir.resolve()
    world, stage1_file = demo_files(args)
    validation = {f"heldout_{kind}": validation_set(out, kind, args.seed) for kind in ("scenes", "faces", "hands")}
    files = {part: args.experts.resolve() / f"{part}.safetensors" for part in world_module.PARTS}
    results = {}
    for name in args.variants:
        sets, steps, variant = GATE_VARIANTS[name]
        (out / name).mkdir(parents=True, exist_ok=True)
        toml = world_module.write_dataset_toml(out / name / "gates.toml", {str(world / s): None for s in sets}, 64, 8)
        trained = _train("gates", out / name, "gates", stage1_file, dataset_config=str(toml),
                         experts=[f"{r}={p}" for r, p in files.items()], max_train_steps=steps,
                         learning_rate=GATE_LEARNING_RATE.get(name, 1e-3), seed=args.seed + 2,
                         gate_variant=variant)
        path = out / name / "evidence.json"
        if not path.exists():
            loaded = [expert_file.load(p, r) for r, p in files.items()]
            measured = evidence.measure(stage1_file, loaded, gate_file.load(trained), validation, seed=args.seed)
            measured.pop("example")
            path.write_text(json.dumps(measured, indent=1))
        results[name] = gate_measures(json.loads(path.read_text()))
    save_variants(out, results)
    print("| variant | identity (best band) | face own-other | hand own-other | global: face on faces - hand | "
          "global: hand on hands - face |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['identity']:.3f} ({r['identity_band']}) | {r['face_own_other']:+.3f} | "
              f"{r['hand_own_other']:+.3f} | {r['global_face']:+.3f} | {r['global_hand']:+.3f} |")
    return 0


SAMPLER_SETTINGS = [(steps, cfg) for steps in (10, 20) for cfg in (3.0, 5.0, 7.5)]
SAMPLER_PROMPTS = 24


def sampler(args) -> int:
    """The sampler-settings study: stage 1's validation pictures per setting, judged; the rule's pick."""
    import contextlib
    import io
    import random

    from comfyui_mole.trainer.benchmarks import evaluate
    from comfyui_mole.trainer.demo import world as world_module

    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    _, stage1_file = demo_files(args)
    rng = random.Random(f"generation-validation:{args.seed}")
    captions = [world_module.scene(rng).caption for _ in range(SAMPLER_PROMPTS)]
    prompts = out / "prompts.csv"
    prompts.write_text("repeat,prompt_id,seed,prompt\n" + "".join(
        f"0,{i},{90_000 + 1000 * args.seed + i},\"{c}\"\n" for i, c in enumerate(captions)))
    models = out / "models.toml"
    models.write_text(f'reference = "stage 1"\n\n[[model]]\nname = "stage 1"\n'
                      f'checkpoint = {json.dumps(str(stage1_file))}\n')
    results = {}
    for steps, cfg in SAMPLER_SETTINGS:
        folder = out / f"steps{steps}_cfg{cfg:g}"
        if not (folder / "summary.json").exists():
            ns = argparse.Namespace(prompts=prompts, models=models, output_dir=folder, limit=None, hps=None,
                                    imagereward=None, clip=None, world_judge=evaluate.JUDGE_FILE, width=64,
                                    height=64, steps=steps, cfg=cfg, sampler_name="ddim", scheduler="ddim_uniform",
                                    negative="", device="cpu", heldout=None)
            with contextlib.redirect_stdout(io.StringIO()):
                if evaluate.run(ns) != 0:
                    raise SystemExit(f"setting {steps} steps, CFG {cfg} failed; see {folder}")
        summary = json.loads((folder / "summary.json").read_text())["models"]["stage 1"]
        results[f"{steps},{cfg:g}"] = {c: summary[c]["mean"] for c in ("all_found", "face_found", "hand_found",
                                                                       "face_detail", "hand_detail") if c in summary}
    (out / "sampler.json").write_text(json.dumps(results, indent=1))
    print("| steps | CFG | all found | face found | hand found | face detail | hand detail |\n"
          "|---|---|---|---|---|---|---|")
    for key, r in results.items():
        steps, cfg = key.split(",")
        print(f"| {steps} | {cfg} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in (
            "all_found", "face_found", "hand_found", "face_detail", "hand_detail")) + " |")
    return 0


def sampler_pick(folders: list[Path]) -> str:
    """The rule over the seeds' sampler.json files: the highest all_found over both seeds, ties within 2/48 broken by
    fewer steps, then the CFG nearest 7.5."""
    runs = [json.loads((f / "sampler.json").read_text()) for f in folders]
    mean = {k: sum(r[k]["all_found"] for r in runs) / len(runs) for k in runs[0]}
    best = max(mean.values())
    tied = [k for k, v in mean.items() if v >= best - 2 / (SAMPLER_PROMPTS * len(runs)) - 1e-9]
    return min(tied, key=lambda k: (int(k.split(",")[0]), abs(float(k.split(",")[1]) - 7.5)))


GATE_MEASURES = ("identity", "face_own_other", "hand_own_other", "smaller_global")


def gates_pick(folders: list[Path], reference: str = "GP") -> str:
    """The close-ups study's rule over the seeds' `gates` output folders: the variant that wins against `reference`
    (higher on at least 3 of the 4 measures averaged over the seeds; then the most measures higher, then the larger
    smaller global difference), or the reference when none qualifies."""
    runs = [json.loads((f / "variants.json").read_text()) for f in folders]

    def mean(name: str, measure: str) -> float:
        values = [min(r[name]["global_face"], r[name]["global_hand"]) if measure == "smaller_global"
                  else r[name][measure] for r in runs]
        return sum(values) / len(values)

    wins = {name: sum(mean(name, m) > mean(reference, m) for m in GATE_MEASURES)
            for name in runs[0] if name != reference}
    qualifying = [name for name, won in wins.items() if won >= 3]
    if not qualifying:
        return reference
    return max(qualifying, key=lambda name: (wins[name], mean(name, "smaller_global")))


def gate_measures(measured: dict) -> dict:
    local = measured["local"]
    bands = {band: row["identity (face - hand) in glyphs"] for band, row in local.items()}
    best = max(bands, key=bands.get)
    mean, glob = local["mean"], measured["global"]
    return {"identity": bands[best], "identity_band": best,
            "face_own_other": mean["face map vs face mask"] - mean["face map vs hand mask"],
            "hand_own_other": mean["hand map vs hand mask"] - mean["hand map vs face mask"],
            "global_face": glob["face close-ups"]["face"] - glob["face close-ups"]["hand"],
            "global_hand": glob["hand close-ups"]["hand"] - glob["hand close-ups"]["face"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pick = commands.add_parser("sampler-pick", help="the sampler study's rule over its seeds' output folders")
    pick.add_argument("folders", type=Path, nargs="+")
    pick.set_defaults(run=lambda a: print(sampler_pick(a.folders)) or 0)
    cross = commands.add_parser("cross-effect-pick", help="the cross-effect study's rule over its seeds' `experts` "
                                                          "output folders")
    cross.add_argument("folders", type=Path, nargs="+")
    cross.set_defaults(run=lambda a: print(cross_effect_pick(a.folders) or "none qualifies") or 0)
    gpick = commands.add_parser("gates-pick", help="the close-ups study's rule over its seeds' `gates` output folders")
    gpick.add_argument("folders", type=Path, nargs="+")
    gpick.set_defaults(run=lambda a: print(gates_pick(a.folders)) or 0)
    for name, fn in (("stage1", stage1), ("experts", experts), ("gates", gates), ("sampler", sampler)):
        sub = commands.add_parser(name)
        sub.add_argument("--demo", type=Path, required=True, help="the demo folder (its world and stage 1)")
        sub.add_argument("--seed", type=int, required=True)
        if name != "stage1":
            sub.add_argument("--output_dir", type=Path, required=True)
        if name == "experts":
            sub.add_argument("--variants", nargs="+", default=list(EXPERT_VARIANTS), choices=list(EXPERT_VARIANTS))
        if name == "gates":
            sub.add_argument("--experts", type=Path, required=True, help="a folder with face.safetensors and "
                                                                         "hand.safetensors")
            sub.add_argument("--variants", nargs="+", default=["G1", "G2", "G1x2"], choices=list(GATE_VARIANTS))
        sub.set_defaults(run=fn)
    args = parser.parse_args()
    from comfyui_mole.trainer.harness.host import use_comfy

    use_comfy()
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
