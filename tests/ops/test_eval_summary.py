"""The evaluation's statistics: mean +- s.e. over repeats, paired difference with a bootstrap interval, win rate."""
import math

import numpy as np
import pytest

from comfyui_mole.trainer.benchmarks.summary import contact_sheet, markdown, stats, summarise


def rows(model: str, values, repeats: int = 3):
    per = len(values) // repeats
    return [{"model": model, "repeat": i // per, "prompt_id": i % per, "seed": 100 + i, "prompt": f"p{i}",
             "hps": v} for i, v in enumerate(values)]


def test_a_model_compared_with_itself_has_difference_zero_and_win_rate_one_half():
    values = np.random.default_rng(0).normal(20, 2, 30)
    table = rows("base", values)
    s = stats(table, "hps", "base", "base")
    assert s["vs_reference"] == {"mean": 0.0, "ci95": [0.0, 0.0], "win_rate": 0.5, "pairs": 30}


def test_mean_and_standard_error_are_over_the_repeats_means():
    values = np.arange(12, dtype=float)            # repeats: [0..3], [4..7], [8..11] -> means 1.5, 5.5, 9.5
    s = stats(rows("m", values), "hps", "m", "m")
    assert s["mean"] == pytest.approx(5.5)
    assert s["se"] == pytest.approx(np.std([1.5, 5.5, 9.5], ddof=1) / math.sqrt(3))
    assert (s["se_over"], s["repeats"], s["images"]) == ("repeats", 3, 12)
    one = stats(rows("m", values, repeats=1), "hps", "m", "m")
    assert one["se_over"] == "prompts" and one["se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(12))


def test_a_planted_better_model_wins_and_its_interval_excludes_zero():
    rng = np.random.default_rng(1)
    base = rng.normal(20, 2, 60)
    better = base + rng.normal(0.5, 0.3, 60)       # the same prompts and seeds, scored higher on most
    worse = base - 0.2
    table = rows("base", base) + rows("better", better) + rows("worse", worse)
    summary = summarise(table, ["base", "better", "worse"], ["hps"], "base", "test")
    b = summary["models"]["better"]["hps"]["vs_reference"]
    assert b["ci95"][0] > 0 and b["win_rate"] > 0.9 and b["mean"] == pytest.approx((better - base).mean())
    w = summary["models"]["worse"]["hps"]["vs_reference"]
    assert w["ci95"][1] < 0 and w["win_rate"] == 0.0
    text = markdown(summary)
    assert "| better |" in text and "+0.5" in text.split("| better |")[1].split("\n")[0]


def test_pairs_are_matched_by_prompt_and_seed_not_by_row_order():
    base = rows("base", [1.0, 2.0, 3.0], repeats=1)
    other = list(reversed(rows("other", [2.0, 3.0, 4.0], repeats=1)))
    s = stats(base + other, "hps", "other", "base")
    assert s["vs_reference"]["mean"] == pytest.approx(1.0) and s["vs_reference"]["win_rate"] == 1.0


def test_the_contact_sheet_shows_the_first_prompts_across_models(tmp_path):
    from PIL import Image

    table = []
    for model, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        for r in rows(model, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], repeats=2):
            r["path"] = tmp_path / f"{model}{r['seed']}.png"
            Image.new("RGB", (32, 32), colour).save(r["path"])
            table.append(r)
    sheet = contact_sheet(table, ["a", "b"], tmp_path / "sheet.png", prompts=2)
    image = np.asarray(Image.open(sheet).convert("RGB")).astype(int)
    left, right = image[:, : image.shape[1] // 2], image[:, image.shape[1] // 2:]
    assert (np.abs(left - [255, 0, 0]).sum(-1) < 30).sum() > 1000
    assert (np.abs(right - [0, 0, 255]).sum(-1) < 30).sum() > 1000
