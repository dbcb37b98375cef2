"""ImageReward in its own environment (scripts/imagereward-env.sh), spoken to by the evaluation's scorer: a small
model of the real BLIP layout (tests/e2e/imagereward_tiny.py) loads strictly and scores deterministically."""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_mole.trainer.benchmarks.scorers import ImageRewardScorer, ScorerError

ROOT = Path(__file__).resolve().parents[2]
TINY = Path(__file__).with_name("imagereward_tiny.py")


@pytest.fixture(scope="module")
def side(tmp_path_factory):
    """The side environment (built by the shipped script, ~15 s) and a tiny ImageReward made in it."""
    folder = tmp_path_factory.mktemp("imagereward")
    env = folder / "venv"
    subprocess.run(["bash", str(ROOT / "scripts" / "imagereward-env.sh"), str(env)], check=True, timeout=600)
    python = env / "bin" / "python"
    subprocess.run([str(python), str(TINY), "make", str(folder / "tiny")], check=True, timeout=300)
    return python, folder / "tiny"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ir_images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (64 + 32 * i, 64, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def scorer(side, checkpoint=None):
    python, tiny = side
    return ImageRewardScorer(checkpoint or tiny / "tiny.pt", tiny / "med_config.json", tiny / "tokenizer", python,
                             worker=TINY)


def test_imagereward_of_the_real_layout_loads_strictly_and_scores_deterministically(side, images):
    items = [(p, t) for p in images for t in ("a woman waving", "a boy holding a red cup")]
    first = scorer(side)
    try:
        a = first.score(items)
    finally:
        first.close()
    second = scorer(side)
    try:
        b = second.score(items)
    finally:
        second.close()
    assert a == b and len(a) == 6 and all(np.isfinite(a)) and len(set(np.round(a, 6))) == 6


def test_a_wrong_checkpoint_or_a_missing_environment_is_named(side, tmp_path, images):
    python, tiny = side
    state = torch.load(tiny / "tiny.pt", weights_only=True)
    del state["mlp.layers.0.weight"]
    broken = tmp_path / "not_imagereward.pt"
    torch.save(state, broken)
    with pytest.raises(ScorerError, match=r"not_imagereward\.pt: not ImageReward's layout .* 1 missing keys"):
        scorer(side, broken)
    with pytest.raises(ScorerError, match=r"--imagereward_python .*nowhere/bin/python: no such file \(build it"):
        ImageRewardScorer(tiny / "tiny.pt", tiny / "med_config.json", tiny / "tokenizer",
                          tmp_path / "nowhere" / "bin" / "python")
    with pytest.raises(ScorerError, match="no vocab.txt"):
        ImageRewardScorer(tiny / "tiny.pt", tiny / "med_config.json", tmp_path, python)
    s = scorer(side)
    try:
        with pytest.raises(ScorerError, match=r"ImageReward on .*missing\.png: .*"):
            s.score([(tmp_path / "missing.png", "a woman")])
        assert len(s.score([(images[0], "a woman")])) == 1, "the process goes on after a bad image"
    finally:
        s.close()
