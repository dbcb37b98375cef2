"""Trainer data: kohya dataset TOML, captions and fine-tune metadata, skipped images, crops, caption shuffling,
latent-cache keys."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_mole.trainer.training.config import ConfigError, TrainConfig
from comfyui_mole.trainer.training.data import (BatchPlan, LatentCache, Subset, datasets_from_config, image_key, load_image,
                                       process_caption, read_metadata)


def images(folder, n, size=(40, 24), captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (10 * i, 100, 200)).save(folder / f"im{i}.png")
        if captions:
            (folder / f"im{i}.txt").write_text(f"caption {i}")
    return folder


def config(**kw):
    return TrainConfig(pretrained_model_name_or_path="x", output_dir="o", output_name="n", **kw)


def test_dataset_toml_general_datasets_subsets(tmp_path):
    images(tmp_path / "a", 3)
    images(tmp_path / "b", 2, captions=False)
    (tmp_path / "b" / "meta.json").write_text(json.dumps({"im0.png": {"caption": "a face", "tags": "smile"},
                                                          "im1": {"caption": "a hand"}}))
    toml = tmp_path / "data.toml"
    toml.write_text('[general]\ncaption_extension = ".txt"\nflip_aug = true\n\n'
                    '[[datasets]]\nresolution = 64\nbatch_size = 2\n\n'
                    '  [[datasets.subsets]]\n  image_dir = "a"\n  num_repeats = 2\n\n'
                    '  [[datasets.subsets]]\n  image_dir = "b"\n  metadata_file = "b/meta.json"\n')
    (d,) = datasets_from_config(config(dataset_config=str(toml)))
    assert d.resolution == (64, 64) and d.batch_size == 2
    assert len(d.items) == 3 * 2 + 2 and not d.skipped
    captions = sorted({c for _, c, _ in d.items})
    assert captions == ["a face, smile", "a hand", "caption 0", "caption 1", "caption 2"]
    assert all(s.flip_aug for _, _, s in d.items)
    plan = BatchPlan([d])
    epoch = plan.epoch(torch.Generator().manual_seed(0))
    assert len(plan) == len(epoch) == 4 and sorted(i for _, b in epoch for i in b) == list(range(8))


def test_unknown_toml_key_is_an_error(tmp_path):
    toml = tmp_path / "data.toml"
    toml.write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n  colour_aug = true\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour_aug'\]"):
        datasets_from_config(config(dataset_config=str(toml)))


def test_unreadable_and_uncaptioned_images_are_skipped_and_counted(tmp_path, caplog):
    folder = images(tmp_path / "d", 3)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("broken")
    Image.new("RGB", (8, 8)).save(folder / "nocaption.png")
    (d,) = datasets_from_config(config(train_data_dir=str(folder), caption_extension=".txt"))
    assert len(d.items) == 3 and len(d.skipped) == 2
    assert "skipped 2 image(s)" in caplog.text
    empty = images(tmp_path / "e", 1, captions=False)
    with pytest.raises(ConfigError, match="no usable training images"):
        datasets_from_config(config(train_data_dir=str(empty)))


def test_metadata_jsonl_and_keys_with_or_without_extension(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text('{"key": "x.jpg", "caption": "one"}\n{"key": "y", "caption": "two", "tags": "t1, t2"}\n')
    assert read_metadata(path) == {"x": "one", "y": "two, t1, t2"}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected an object"):
        read_metadata(bad)


def test_resize_to_cover_and_center_crop(tmp_path):
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    for x in range(40, 60):
        for y in range(50):
            img.putpixel((x, y), (255, 255, 255))     # a white stripe in the middle
    img.save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", (32, 48))  # (W, H): scale to height 48 -> 96 wide, crop 32
    assert out.shape == (48, 32, 3)
    assert out[:, 16].mean() > 0.9 and out[:, 0].mean() < 0.1   # the stripe stays centred
    flipped = load_image(tmp_path / "wide.png", (32, 48), flip=True)
    assert torch.equal(flipped, out.flip(1))


def test_shuffle_caption_keeps_the_first_tokens():
    subset = Subset("x", shuffle_caption=True, keep_tokens=1)
    caption = "a person, smiling, waving, blue sky, outdoors"
    shuffled = {process_caption(caption, subset, torch.Generator().manual_seed(s)) for s in range(10)}
    assert len(shuffled) > 1 and all(s.startswith("a person, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)


def test_caption_dropout_empties_that_share_of_captions_and_draws_only_when_asked(tmp_path):
    """kohya's caption_dropout_rate: a subset key, and the flag's value for subsets that do not set it."""
    gen = torch.Generator().manual_seed(0)
    dropped = [process_caption("a person", Subset("x", caption_dropout_rate=0.25), gen) for _ in range(2000)]
    assert set(dropped) == {"", "a person"} and 0.2 < dropped.count("") / 2000 < 0.3
    state = gen.get_state()
    assert process_caption("a person", Subset("x"), gen) == "a person"
    assert torch.equal(gen.get_state(), state)              # rate 0: no draw, so earlier runs stay bitwise alike
    images(tmp_path / "a", 1)
    images(tmp_path / "b", 1)
    toml = tmp_path / "data.toml"
    toml.write_text('[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "a"\n'
                    '  caption_extension = ".txt"\n  caption_dropout_rate = 0.5\n'
                    '  [[datasets.subsets]]\n  image_dir = "b"\n  caption_extension = ".txt"\n')
    (d,) = datasets_from_config(config(dataset_config=str(toml), caption_dropout_rate=0.1))
    assert [s.caption_dropout_rate for s in d.subsets] == [0.5, 0.1]
    (d,) = datasets_from_config(config(train_data_dir=str(tmp_path / "a"), caption_extension=".txt",
                                       caption_dropout_rate=0.3))
    assert d.subsets[0].caption_dropout_rate == 0.3
    toml.write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n  caption_dropout_rate = 2\n')
    with pytest.raises(ConfigError, match=r"subset #1: caption_dropout_rate = 2 should be a number from 0 to 1"):
        datasets_from_config(config(dataset_config=str(toml)))


def test_latent_cache_key_follows_image_size_flip_and_vae(tmp_path):
    images(tmp_path, 1)
    path = tmp_path / "im0.png"
    key = image_key(path, (64, 64), False, "vae1")
    assert key == image_key(path, (64, 64), False, "vae1")
    assert len({key, image_key(path, (64, 64), True, "vae1"), image_key(path, (64, 96), False, "vae1"),
                image_key(path, (64, 64), False, "vae2")}) == 4
    Image.new("RGB", (40, 24), (1, 2, 3)).save(path)
    assert image_key(path, (64, 64), False, "vae1") != key
    cache = LatentCache(tmp_path / "cache")
    cache.put(key, torch.ones(4, 8, 8))
    again = LatentCache(tmp_path / "cache")
    assert torch.equal(again.get(key), torch.ones(4, 8, 8)) and again.hits == 1
    (tmp_path / "cache" / f"{key}.safetensors").write_bytes(b"damaged")
    assert LatentCache(tmp_path / "cache").get(key) is None     # re-encoded, never fatal


def test_text_cache_keys_bound_and_disk(tmp_path):
    """Text-encoder outputs by encoder id and caption: another encoder or caption is another entry; beyond its
    byte limit the least recently used entry goes; on disk a later cache reads them back, and a damaged file or
    one of another caption under the same name is a miss, never an error."""
    from comfyui_mole.trainer.training.model import TextCache

    context, pooled = torch.randn(1, 77, 8), torch.randn(1, 4)
    cache = TextCache(limit=3 * context.nbytes)
    cache.put("te1", "a face", context, None)
    assert cache.get("te2", "a face") is None and cache.get("te1", "a hand") is None
    assert torch.equal(cache.get("te1", "a face")[0], context)
    for caption in ("b", "c", "d"):
        cache.put("te1", caption, context + 1, None)
    assert cache.get("te1", "a face") is None and cache.get("te1", "d") is not None   # the oldest went
    assert cache.bytes == 3 * context.nbytes

    folder = tmp_path / "text"
    TextCache().put("te1", "a face", context, pooled, folder=folder)
    again = TextCache()
    hit = again.get("te1", "a face", folder)
    assert torch.equal(hit[0], context) and torch.equal(hit[1], pooled) and again.hits == 1
    (path,) = folder.glob("*.safetensors")
    path.write_bytes(b"damaged")
    assert TextCache().get("te1", "a face", folder) is None
    TextCache().put("te1", "another caption", context, None, folder=tmp_path / "other")
    (tmp_path / "other" / next((tmp_path / "other").iterdir()).name).rename(path)
    assert TextCache().get("te1", "a face", folder) is None       # a file that is not this caption's


def test_masks_from_a_conditioning_folder_and_from_alpha_follow_crop_and_flip(tmp_path):
    """kohya's masked-loss inputs: a mask image of the same name (red channel) or the image's alpha channel,
    cropped and mirrored exactly like the image; images without a mask are counted."""
    from comfyui_mole.trainer.training.data import load_mask, mask_source

    folder = images(tmp_path / "img", 3, size=(80, 40))
    masks = tmp_path / "masks"
    masks.mkdir()
    left = Image.new("RGB", (80, 40), (0, 0, 0))
    left.paste((255, 0, 0), (0, 0, 20, 40))                  # red (the channel kohya reads) on the left quarter
    left.save(masks / "im0.png")
    Image.new("L", (80, 40), 128).save(masks / "im1.jpg")   # another extension, gray
    rgba = Image.new("RGBA", (80, 40), (200, 10, 10, 0))
    rgba.paste((200, 10, 10, 255), (60, 0, 80, 40))         # opaque on the right quarter
    rgba.save(folder / "im2.png")

    subset = Subset(str(folder), ".txt", conditioning_data_dir=str(masks), alpha_mask=True)
    sources = [mask_source(folder / f"im{i}.png", subset) for i in range(3)]
    assert sources == [(masks / "im0.png", False), (masks / "im1.jpg", False), (folder / "im2.png", True)]
    assert mask_source(folder / "im0.png", Subset(str(folder))) is None

    m = load_mask(masks / "im0.png", False, (40, 40))        # 80x40 covers 40x40: scaled to 80x40, centre cut
    assert m.shape == (40, 40) and m.max() == 0              # the left quarter is cut away
    wide = load_mask(masks / "im0.png", False, (80, 40))
    assert wide[:, :18].min() == 1 and wide[:, 22:].max() == 0
    assert torch.equal(load_mask(masks / "im0.png", False, (80, 40), flip=True), wide.flip(-1))
    assert abs(float(load_mask(masks / "im1.jpg", False, (80, 40)).mean()) - 128 / 255) < 0.01
    alpha = load_mask(folder / "im2.png", True, (80, 40))
    assert alpha[:, 62:].min() == 1 and alpha[:, :58].max() == 0

    toml = tmp_path / "data.toml"
    toml.write_text('[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "img"\n'
                    '  caption_extension = ".txt"\n  conditioning_data_dir = "masks"\n')
    (d,) = datasets_from_config(config(dataset_config=str(toml), masked_loss=True))
    assert sorted(m is not None for m in d.masks.values()) == [False, True, True]
    plan = BatchPlan([d])
    batch = plan.make((0, [0, 1, 2]), torch.Generator().manual_seed(0))
    assert [m is not None for m in batch.masks] == [d.masks[p.path] is not None for p in batch.images]
    with pytest.raises(ConfigError, match="no image has a mask"):
        datasets_from_config(config(train_data_dir=str(images(tmp_path / "bare", 1)), caption_extension=".txt",
                                    masked_loss=True))
    with pytest.raises(ConfigError, match="conditioning_data_dir holds loss masks here: give --masked_loss"):
        from comfyui_mole.trainer.training.config import validate

        validate(config(train_data_dir=str(folder), conditioning_data_dir=str(masks), max_train_steps=2))


# -- kohya's random_crop and color_aug -----------------------------------------------------------------------------
def test_random_crop_cuts_where_drawn_and_the_mask_follows(tmp_path):
    from comfyui_mole.trainer.training.data import load_mask

    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 50))           # a white band on the left edge
    img.save(tmp_path / "wide.png")
    img.convert("L").save(tmp_path / "mask.png")
    centre = load_image(tmp_path / "wide.png", (32, 48))                  # scaled to 96x48, 64 pixels of slack
    left = load_image(tmp_path / "wide.png", (32, 48), crop=(0.0, 0.5))
    right = load_image(tmp_path / "wide.png", (32, 48), crop=(1.0, 0.5))
    assert torch.equal(load_image(tmp_path / "wide.png", (32, 48), crop=(0.5, 0.5)), centre)
    assert left[:, :16].mean() > 0.9 and centre.max() < 0.1 and right.max() < 0.1
    mask = load_mask(tmp_path / "mask.png", False, (32, 48), crop=(0.0, 0.5))
    assert torch.equal(mask, left[..., 0])


def test_random_crop_and_color_aug_draw_every_step_and_only_when_on(tmp_path):
    images(tmp_path / "a", 4)
    (d,) = datasets_from_config(config(train_data_dir=str(tmp_path / "a"), caption_extension=".txt",
                                       random_crop=True, color_aug=True))
    assert all(s.random_crop and s.color_aug for s in d.subsets)
    plan, gen = BatchPlan([d]), torch.Generator().manual_seed(0)
    pictures = [p for _ in range(300) for p in plan.make((0, [0]), gen).images]
    crops = {p.crop for p in pictures}
    assert len(crops) == 300 and all(0 <= v <= 1 for c in crops for v in c)
    colors = [p.color for p in pictures]
    changed = [c for c in colors if c is not None]
    assert 0.25 < len(changed) / 300 < 0.41                 # kohya: a third of the time
    hues = [v for k, v in changed if k == "hue"]
    gammas = [v for k, v in changed if k == "gamma"]
    assert hues and gammas and all(-8 <= v <= 8 for v in hues) and all(0.95 <= v <= 1.05 for v in gammas)
    (plain,) = datasets_from_config(config(train_data_dir=str(tmp_path / "a"), caption_extension=".txt"))
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    picture = BatchPlan([plain]).make((0, [0]), gen).images[0]
    assert picture.crop is None and picture.color is None and torch.equal(gen.get_state(), state)
    with pytest.raises(ConfigError, match=r"--cache_latents: random_crop \(subset .*\) makes a new picture every "):
        datasets_from_config(config(train_data_dir=str(tmp_path / "a"), caption_extension=".txt",
                                    random_crop=True, cache_latents=True))
    toml = tmp_path / "data.toml"
    toml.write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n  caption_extension = ".txt"\n'
                    '  color_aug = true\n  [[datasets.subsets]]\n  image_dir = "a"\n  caption_extension = ".txt"\n')
    (d,) = datasets_from_config(config(dataset_config=str(toml), random_crop=True))
    assert [(s.color_aug, s.random_crop) for s in d.subsets] == [(True, True), (False, True)]
    toml.write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n  random_crop = "yes"\n')
    with pytest.raises(ConfigError, match=r"subset #1: random_crop = 'yes' should be true or false"):
        datasets_from_config(config(dataset_config=str(toml)))


def test_color_changes_are_kohyas():
    """A hue shift of 8 (OpenCV's 0-180 scale: 16 degrees) turns red towards yellow and keeps its brightness;
    kohya's gamma acts on the 0-255 values themselves (v ** gamma, clipped)."""
    from comfyui_mole.trainer.training.data import recolor

    red = np.full((4, 4, 3), (200, 0, 0), np.uint8)
    shifted = recolor(red, ("hue", 8.0))[0, 0]
    assert shifted[0] >= 195 and 30 < shifted[1] < 70 and shifted[2] < 5
    assert recolor(red, ("hue", -8.0))[0, 0][2] > 30               # the other way: towards magenta
    assert recolor(red, None) is red
    gray = np.array([[[200, 100, 1]]], np.uint8)
    assert recolor(gray, ("gamma", 1.05)).tolist() == [[[255, 125, 1]]]
    assert recolor(gray, ("gamma", 0.95)).tolist() == [[[153, 79, 1]]]


# -- kohya's caption keys ---------------------------------------------------------------------------------------------
def test_prefix_suffix_separators_and_the_first_line():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    subset = Subset("x", caption_prefix="mole style,", caption_suffix=", best", secondary_separator=";;")
    assert process_caption("a person;;waving", subset, gen) == "mole style, a person,waving , best"
    assert process_caption("a person\nsecond line", Subset("x"), gen) == "a person"      # kohya: the first line
    assert torch.equal(gen.get_state(), state)              # nothing random asked: nothing drawn
    kept = Subset("x", shuffle_caption=True, keep_tokens_separator="|||")
    for seed in range(5):
        out = process_caption("a person, photo ||| b, c, d ||| best, sharp", kept, torch.Generator().manual_seed(seed))
        assert out.startswith("a person, photo, ") and out.endswith(", best, sharp")
        assert sorted(out.split(", ")[2:5]) == ["b", "c", "d"]
    semicolons = Subset("x", shuffle_caption=True, keep_tokens=1, caption_separator=";")
    assert process_caption("a;b", semicolons, torch.Generator()) == "a, b"


def test_tag_dropout_epoch_dropout_wildcards_and_token_warmup():
    gen = torch.Generator().manual_seed(0)
    tags = ", ".join(f"t{i}" for i in range(10))
    kept = [process_caption(tags, Subset("x", keep_tokens=2, caption_tag_dropout_rate=0.5), gen).split(", ")
            for _ in range(200)]
    assert all(k[:2] == ["t0", "t1"] for k in kept)
    assert 0.4 < sum(len(k) - 2 for k in kept) / (200 * 8) < 0.6   # half of the other tags stay
    every = Subset("x", caption_dropout_every_n_epochs=2)
    assert [process_caption("a", every, gen, epoch=e) for e in (1, 2, 3, 4)] == ["a", "", "a", ""]
    wild = Subset("x", enable_wildcard=True)
    drawn = {process_caption("a {red|blue} shirt, {{literal}}\nsecond", wild, gen) for _ in range(60)}
    assert drawn == {"a red shirt, {literal}", "a blue shirt, {literal}", "second"}
    warm = Subset("x", token_warmup_min=1, token_warmup_step=0.5)        # half of a 10-step run
    lengths = [len(process_caption(tags, warm, gen, step=s, total_steps=10).split(", ")) for s in range(7)]
    assert lengths == [1, 2, 4, 6, 8, 10, 10]


def test_class_tokens_and_kohyas_other_dataset_keys(tmp_path, caplog):
    images(tmp_path / "a", 2, captions=False)
    toml = tmp_path / "data.toml"
    toml.write_text('[general]\ncache_info = true\nresize_interpolation = "lanczos"\n[[datasets]]\nresolution = 64\n'
                    '  [[datasets.subsets]]\n  image_dir = "a"\n  class_tokens = "sks person"\n')
    with caplog.at_level("INFO", logger="mole.train"):
        (d,) = datasets_from_config(config(dataset_config=str(toml)))
    assert [c for _, c, _ in d.items] == ["sks person", "sks person"]
    assert "cache_info = True: no effect here" in caplog.text and "resize_interpolation = 'lanczos'" in caplog.text
    for key, value, reason in (("face_crop_aug_range", "[2.0, 4.0]", "face-centred crops need face boxes"),
                               ("is_reg", "true", "regularisation"), ("validation_split", "0.1", "no validation"),
                               ("resize_interpolation", '"area"', "Lanczos"),
                               ("network_multiplier", "0.5", "multiplier 1")):
        toml.write_text(f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n  {key} = {value}\n')
        with pytest.raises(ConfigError, match=rf"subsets\]\] #1: {key} = .*: not supported: .*{reason}"):
            datasets_from_config(config(dataset_config=str(toml)))
    toml.write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n  caption_prefix = 3\n')
    with pytest.raises(ConfigError, match="caption_prefix = 3 should be a string"):
        datasets_from_config(config(dataset_config=str(toml)))
