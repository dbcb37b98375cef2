"""The demo report's goals at a glance: each target of SPEC.md section 7 read from the evidence, the precondition
and the in-world evaluation, and judged as the issue states it."""
from comfyui_mole.trainer.demo.pipeline import FULL, QUICK, SCRATCH_STAGE1_STEPS, recipe_for
from comfyui_mole.trainer.demo.report import GATED, generating_gate_goals, generation_goals, goals, goals_table


def evidence(identity=(0.6, 0.8, 0.7, 0.7), face_maps=(0.9, 0.7), hand_maps=(0.8, 0.75), glob=(0.6, 0.5, 0.52, 0.5)):
    bands = ("t=800", "t=500", "t=200", "mean")
    local = {band: {"identity (face - hand) in glyphs": v, "face map vs face mask": face_maps[0],
                    "face map vs hand mask": face_maps[1], "hand map vs hand mask": hand_maps[0],
                    "hand map vs face mask": hand_maps[1]} for band, v in zip(bands, identity)}
    return {"local": local, "global": {"face close-ups": {"face": glob[0], "hand": glob[1]},
                                       "hand close-ups": {"hand": glob[2], "face": glob[3]}}}


def evaluation(gated=0.05, fixed=(0.051, 0.06, 0.07)):
    names = ("+ experts, fixed scale 0.25", "+ experts, fixed scale 0.5", "+ experts, fixed scale 1 (no gates)")
    models = {name: {"loss": {"mean": v}} for name, v in zip(names, fixed)}
    return {"models": {**models, GATED: {"loss": {"mean": gated}}}}


def effect(face=(-0.01, 0.002, 0.001), hand=(-0.004, 0.001, 0.003)):
    regions = ["face", "hand", "background"]
    return {"regions": regions, "delta": {"face": {"mean": dict(zip(regions, face))},
                                          "hand": {"mean": dict(zip(regions, hand))}}}


def test_each_goal_is_judged_against_its_target():
    rows = goals(evidence(), evaluation(), effect())
    assert [r["met"] for r in rows] == [True, False, True, True, False, True, False, True]
    assert rows[2]["measured"] == "0.800 (t=500)"                      # the best band
    assert rows[3]["measured"] == "+0.200" and rows[4]["measured"] == "+0.050"
    assert rows[5]["measured"] == "+0.100" and rows[6]["measured"] == "+0.020"
    assert "fixed scale 0.25" in rows[7]["measured"]
    table = goals_table(rows)
    assert table[0] == "| goal | measured | target | met? |" and len(table) == 2 + len(rows)
    assert sum("**no**" in line for line in table) == 3


def test_without_a_precondition_measure_or_fixed_scales_those_rows_are_left_out():
    rows = goals(evidence(), {"models": {}}, None)
    assert len(rows) == 5 and not any(r["goal"].startswith("precondition") for r in rows)
    worse = goals(evidence(), evaluation(gated=0.052), None)
    assert worse[-1]["met"] is False


def test_generation_goal_reads_stage_1s_share_of_complete_people():
    def summary(share):
        return {"reference": "+ stage 1", "models": {"+ stage 1": {"all_found": {"mean": share, "images": 24}}}}

    (row,) = generation_goals(summary(0.75))
    assert row["measured"] == "0.75 of 24" and not row["met"]
    assert generation_goals(summary(0.92))[0]["met"]
    assert generation_goals({"reference": "+ stage 1", "models": {}}) == []


def test_gate_goals_while_generating_read_the_curves_and_the_best_band():
    found = {"experts": ["face", "hand"],
             "global": {"face close-ups": [[0.7, 0.6], [0.7, 0.6]], "hand close-ups": [[0.6, 0.62], [0.6, 0.62]]},
             "local": {"early: steps 1-7": {"identity (face - hand) in glyphs": 0.6},
                       "late: steps 14-20": {"identity (face - hand) in glyphs": 0.8},
                       "mean": {"identity (face - hand) in glyphs": 0.9}}}
    rows = generating_gate_goals(found)
    assert [(r["measured"], r["met"]) for r in rows] == [("+0.100", True), ("+0.020", False), ("0.800 (late)", True)]


def test_from_scratch_keeps_the_random_base_and_the_longer_stage_1():
    assert recipe_for(False, False) == FULL and recipe_for(True, False) == QUICK
    scratch = recipe_for(False, True)
    assert scratch.from_scratch and scratch.stage1_steps == SCRATCH_STAGE1_STEPS > FULL.stage1_steps
    assert recipe_for(True, True).stage1_steps == QUICK.stage1_steps
