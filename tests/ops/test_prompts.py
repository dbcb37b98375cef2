"""The prompt benchmarks on small COCO- and DiffusionDB-shaped files with known answers."""
import csv
import json
from types import SimpleNamespace

import pytest

from comfyui_mole.trainer.benchmarks import prompts
from comfyui_mole.trainer.training.config import ConfigError


def test_human_words_are_whole_words_with_plurals():
    pattern = prompts.human_pattern()
    for text in ("A man riding a horse", "two women on a bench", "Children playing", "the PEOPLE wait",
                 "a boy's kite", "kids at a party", "three ladies dancing", "a teenager."):
        assert pattern.search(text), text
    for text in ("a snowman in a field", "Manhattan skyline", "a mannequin", "the boyfriend jeans box",
                 "a kidney bean", "a personal computer", "a dog on a sofa"):
        assert not pattern.search(text), text
    assert prompts.human_pattern(("cat",)).search("two cats") and not prompts.human_pattern(("cat",)).search("a man")


def test_coco_human_prompts(tmp_path):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 1, "id": 1, "caption": "A woman holding an umbrella."},
        {"image_id": 1, "id": 2, "caption": "a  woman holding an umbrella. "},       # duplicate after normalising
        {"image_id": 2, "id": 3, "caption": "A red bus on the street."},
        {"image_id": 3, "id": 4, "caption": "Two men playing frisbee."},
        {"image_id": 4, "id": 5, "caption": "   "},
        {"image_id": 5, "id": 6, "caption": "A snowman [in the park]"}]}))        # COCO: special symbols stay
    out = tmp_path / "out"
    prompts.run(SimpleNamespace(coco=coco, diffusiondb=None, output_dir=out, k=10, repeats=2, seed=1,
                                human_words=None, nsfw_threshold=0.5))
    report = json.loads((out / "prompts_report.json").read_text())
    assert report["rows_read"] == 6 and report["kept_unique"] == 2
    assert report["dropped"] == {"duplicate": 1, "no human word": 2, "empty": 1}
    with open(out / "prompts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["repeat"] for r in rows} == {"0", "1"}
    assert sorted({r["prompt"] for r in rows}) == ["A woman holding an umbrella.", "Two men playing frisbee."]
    assert len({r["seed"] for r in rows}) == 4                     # one generation seed per row


def test_diffusiondb_human_prompts_drop_nsfw_and_special_symbols(tmp_path):
    table = tmp_path / "metadata.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "prompt_nsfw", "image_nsfw", "seed"])
        writer.writeheader()
        writer.writerows([
            {"prompt": "portrait of a girl, oil painting", "prompt_nsfw": "0.01", "image_nsfw": "0.1", "seed": 1},
            {"prompt": "portrait of a girl, nude", "prompt_nsfw": "0.8", "image_nsfw": "0.1", "seed": 2},
            {"prompt": "a boy at the beach", "prompt_nsfw": "0.0", "image_nsfw": "2.0", "seed": 3},   # blurred by SD
            {"prompt": "a (beautiful:1.2) woman", "prompt_nsfw": "0.0", "image_nsfw": "0.0", "seed": 4},
            {"prompt": "a man {in the style of} x", "prompt_nsfw": "0.0", "image_nsfw": "0.0", "seed": 5},
            {"prompt": "a castle at night", "prompt_nsfw": "0.0", "image_nsfw": "0.0", "seed": 6},
            {"prompt": "an old man reading", "prompt_nsfw": "", "image_nsfw": "0.3", "seed": 7}])
    texts = [(r["prompt"], r) for r in prompts.diffusiondb_rows(table)]
    kept, dropped, examples = prompts.select(texts, prompts.HUMAN_WORDS, 0.5, prompts.SPECIAL)
    assert kept == ["portrait of a girl, oil painting", "an old man reading"]
    assert dropped == {"flagged NSFW (prompt_nsfw >= 0.5)": 1, "flagged NSFW (image_nsfw >= 0.5)": 1,
                       "special symbols": 2, "no human word": 1}
    assert examples["special symbols"] == ["a (beautiful:1.2) woman", "a man {in the style of} x"]


def test_sampling_is_deterministic_and_bad_inputs_fail_clearly(tmp_path):
    pool = [f"a person number {i}" for i in range(50)]
    a, b = prompts.sample(pool, 10, 3, seed=7), prompts.sample(pool, 10, 3, seed=7)
    assert a == b and len(a) == 30 and prompts.sample(pool, 10, 3, seed=8) != a
    assert all(len({r["prompt_id"] for r in a if r["repeat"] == k}) == 10 for k in range(3))
    assert len(prompts.sample(pool[:4], 10, 2, seed=0)) == 8                      # all of a small pool, per repeat
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="not a COCO captions JSON"):
        prompts.coco_captions(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt\n")
    with pytest.raises(ConfigError, match="no rows with a 'prompt' column"):
        prompts.diffusiondb_rows(empty)
    only_cars = tmp_path / "cars.json"
    only_cars.write_text(json.dumps({"annotations": [{"caption": "a car"}]}))
    with pytest.raises(ConfigError, match="no prompt is left after the filters"):
        prompts.run(SimpleNamespace(coco=only_cars, diffusiondb=None, output_dir=tmp_path / "o", k=3, repeats=1,
                                    seed=0, human_words=None, nsfw_threshold=0.5))
    words = tmp_path / "words.txt"
    words.write_text("astronaut\nrobot\n")
    assert prompts.read_words(str(words)) == ("astronaut", "robot") and prompts.read_words("a, b") == ("a", "b")
