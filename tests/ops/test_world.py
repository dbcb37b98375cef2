"""The synthetic world: masks match the drawn glyphs, captions match the content; and the evidence's AUC."""
import random

import numpy as np
import pytest

from comfyui_mole.trainer.demo.evidence import auc, cell_labels
from comfyui_mole.trainer.demo.world import (BACKGROUNDS, LIGHT_LINES, closeup, detail_contrast, load_masks, scene,
                                             write_world)


def nearest(colour, table):
    return min(table, key=lambda n: sum((int(a) - int(b)) ** 2 for a, b in zip(table[n], colour)))


@pytest.mark.parametrize("seed", range(12))
def test_scene_masks_match_glyphs_and_caption_matches_content(seed):
    p = scene(random.Random(seed), 64)
    pixels = np.asarray(p.image).astype(int)
    face, hand = p.masks["face"], p.masks["hand"]
    assert not (face & hand).any()
    assert np.pi * 10.5 ** 2 <= face.sum() <= np.pi * 14.5 ** 2 and hand.sum() > 150   # several latent cells each
    background = tuple(pixels[0, 0])
    assert not (np.abs(pixels[face] - background).sum(-1) < 10).any()     # no background inside the masks
    assert not (np.abs(pixels[hand] - background).sum(-1) < 10).any()
    skin_face = np.median(pixels[face], axis=0)
    skin_hand = np.median(pixels[hand], axis=0)
    assert np.abs(skin_face - skin_hand).max() <= 2                       # one person, one skin colour
    ring = np.zeros_like(face)
    ys, xs = np.nonzero(face)
    ring[max(0, ys.min() - 2):ys.max() + 3, max(0, xs.min() - 2):xs.max() + 3] = True
    assert np.abs(pixels[ring & ~face & ~hand] - skin_face).sum(-1).min() > 0   # the mask covers the whole disc
    assert f"{nearest(background, BACKGROUNDS)} background" in p.caption
    if "raising the" in p.caption:
        side = "right" if np.nonzero(hand)[1].mean() > xs.mean() else "left"
        assert f"the {side} hand" in p.caption


@pytest.mark.parametrize("seed", range(6))
def test_plain_scenes_have_the_silhouettes_without_the_detail(seed):
    """Stage 1's scenes: a bare skin disc and a mitten where the detailed scenes have hair, eyes, a smile,
    fingers, knuckles and a cuff."""
    plain, detailed = scene(random.Random(seed), 64, detailed=False), scene(random.Random(seed), 64)
    assert plain.caption == detailed.caption and np.array_equal(plain.masks["face"], detailed.masks["face"])
    for p, spread in ((plain, 0), (detailed, 60)):
        pixels = np.asarray(p.image).astype(int)
        for part in ("face", "hand"):
            inside = pixels[p.masks[part]]
            deviation = np.abs(inside - np.median(inside, axis=0)).sum(-1)
            assert (deviation.max() <= 2) if spread == 0 else (deviation.max() > spread), (part, deviation.max())


@pytest.mark.parametrize("seed", range(3))
def test_only_the_named_parts_are_detailed(seed):
    """An expert's own-part scenes: its part detailed, the other drawn as stage 1 knows it; same geometry."""
    both, face_only, hand_only, plain = (scene(random.Random(seed), 64, detailed=d)
                                         for d in (True, ("face",), ("hand",), False))
    pixels = {k: np.asarray(p.image).astype(int) for k, p in
              {"both": both, "face": face_only, "hand": hand_only, "plain": plain}.items()}
    for part, other in (("face", "hand"), ("hand", "face")):
        own, rest = both.masks[part], both.masks[other]
        assert np.array_equal(pixels[part][own], pixels["both"][own])
        assert np.array_equal(pixels[part][rest], pixels["plain"][rest])


def test_both_parts_carry_comparable_detail():
    """The precondition of the world itself: a hand's detail (against a mitten) is not much fainter than a
    face's (against a bare disc); in world version 2 it was a third of it."""
    for seed in (0, 1):
        contrast = detail_contrast(seed, count=24)
        assert min(contrast.values()) >= 0.5 * max(contrast.values()) and min(contrast.values()) > 0.02, contrast


@pytest.mark.parametrize("seed", range(3))
def test_light_hand_lines_change_only_the_lines(seed):
    """The contrary-detail study's pictures: the same picture from the same stream, the hand's lines light instead
    of dark, as strong a detail as the face's; the face and the plain scenes untouched; an unknown tone refused."""
    dark, light = scene(random.Random(seed), 64), scene(random.Random(seed), 64, hand_lines="light")
    a, b = np.asarray(dark.image).astype(int), np.asarray(light.image).astype(int)
    changed = np.abs(a - b).sum(-1) > 0
    assert dark.caption == light.caption and changed.any()
    ys, xs = np.nonzero(dark.masks["hand"])
    box = np.zeros_like(changed)
    box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True                # (the lines fill the gaps between
    assert not (changed & ~box).any()                                        # the fingers, outside the mask)
    lines = b[changed]
    assert (np.abs(lines - LIGHT_LINES).sum(-1) <= 2).mean() > 0.9 and (a[changed].sum(-1) < lines.sum(-1)).all()
    assert np.array_equal(np.asarray(scene(random.Random(seed), 64, detailed=False).image),
                          np.asarray(scene(random.Random(seed), 64, detailed=False, hand_lines="light").image))
    contrast = detail_contrast(seed, count=24, hand_lines="light")
    assert min(contrast.values()) >= 0.7 * max(contrast.values()), contrast
    with pytest.raises(ValueError, match="hand lines"):
        scene(random.Random(seed), 64, hand_lines="pink")


@pytest.mark.parametrize("part", ["face", "hand"])
def test_closeups(part):
    p = closeup(random.Random(3), part, 64)
    other = "hand" if part == "face" else "face"
    assert p.masks[part].mean() > 0.25 and not p.masks[other].any()
    assert f"close-up of {'a smiling face' if part == 'face' else 'an open hand'}" in p.caption
    assert f"{nearest(tuple(np.asarray(p.image)[0, 0]), BACKGROUNDS)} background" in p.caption


def test_write_world_writes_kohya_sets_and_reuses_them(tmp_path):
    from comfyui_mole.trainer.training.config import TrainConfig
    from comfyui_mole.trainer.training.data import datasets_from_config

    paths = write_world(tmp_path, seed=1, train=6, closeups=4, heldout=3, batch_size=2)
    stamp = (paths["scenes"] / "scenes_0000.png").stat().st_mtime_ns
    assert write_world(tmp_path, seed=1, train=6, closeups=4, heldout=3, batch_size=2) == paths
    assert (paths["scenes"] / "scenes_0000.png").stat().st_mtime_ns == stamp
    (d,) = datasets_from_config(TrainConfig(pretrained_model_name_or_path="x", output_dir="o", output_name="n",
                                            dataset_config=str(paths["face_expert_toml"]), masked_loss=True))
    assert len(d.items) == 6 + 4 and d.batch_size == 2 and all(m is not None for m in d.masks.values())
    assert sum("close-up of a smiling face" in c for _, c, _ in d.items) == 4
    scene_mask = d.masks[paths["scenes"] / "scenes_0000.png"]
    assert scene_mask == (paths["scenes"] / "face_masks" / "scenes_0000.png", False)
    (plain,) = datasets_from_config(TrainConfig(pretrained_model_name_or_path="x", output_dir="o", output_name="n",
                                                dataset_config=str(paths["plain_toml"])))
    assert len(plain.items) == 6 and not plain.masks
    held = load_masks(paths["heldout_scenes"])
    assert len(held) == 3 and all(m["face"].any() and m["hand"].any() for _, _, m in held)
    assert not np.array_equal(np.asarray(load_masks(paths["scenes"])[0][2]["face"]), held[0][2]["face"])


def test_auc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)          # many ties
    labels = rng.random(200) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc(scores, labels) == pytest.approx(pairwise)
    assert auc(np.arange(10.0), np.arange(10) >= 5) == 1.0
    assert np.isnan(auc(np.ones(3), np.zeros(3, bool)))


def test_cell_labels_are_area_fractions():
    mask = np.zeros((64, 64), bool)
    mask[:8, :8] = True
    mask[8:12, 8:16] = True
    cells = cell_labels(mask, (8, 8))
    assert cells[0, 0] == 1.0 and cells[1, 1] == 0.5 and cells[2, 2] == 0.0
