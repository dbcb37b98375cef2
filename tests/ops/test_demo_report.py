"""The demo report's goals at a glance: each target of SPEC.md section 7 read from the evidence, the precondition
and the in-world evaluation, and judged as the issue states it."""
from comfyui_mole.trainer.demo.report import GATED, goals, goals_table


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
