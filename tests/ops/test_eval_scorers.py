"""The evaluation's scorers on random-weight models of the real architectures (tests/ops/tiny_scorers.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_scorers import TINY_H14, write_tiny_hps

from comfyui_mole.trainer.benchmarks.scorers import OpenClipScorer, ScorerError


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    return write_tiny_hps(tmp_path_factory.mktemp("hps"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate(((64, 64), (96, 64), (512, 512))):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_an_hps_checkpoint_in_the_official_layout_loads_strictly_and_scores_deterministically(hps, images):
    config, checkpoint = hps
    items = [(p, t) for p in images for t in ("a woman waving", "a man with a dog")]
    first = OpenClipScorer("hps", checkpoint, str(config), "--hps").score(items)
    again = OpenClipScorer("hps", checkpoint, str(config), "--hps").score(items)
    assert first == again and len(first) == len(items)
    assert all(-100 <= v <= 100 for v in first) and len(set(first)) == len(first)
    # batched or one by one: the same score (to float rounding)
    alone = [OpenClipScorer("hps", checkpoint, str(config), "--hps", batch_size=1).score([i])[0] for i in items[:2]]
    assert np.allclose(alone, first[:2], atol=1e-4)


def test_score_is_100_times_the_cosine_of_image_and_prompt_features(hps, images):
    config, checkpoint = hps
    scorer = OpenClipScorer("hps", checkpoint, str(config), "--hps")
    image = scorer.transform(Image.open(images[0]).convert("RGB"))[None]
    with torch.no_grad():
        a = scorer.model.encode_image(image)
        b = scorer.model.encode_text(scorer.tokenizer(["a woman waving"]))
    expected = 100 * torch.nn.functional.cosine_similarity(a, b).item()
    assert scorer.score([(images[0], "a woman waving")])[0] == pytest.approx(expected, abs=1e-4)


def test_a_wrong_or_missing_checkpoint_is_refused_with_the_file_named(hps, tmp_path):
    config, checkpoint = hps
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    del state["logit_scale"]
    broken = tmp_path / "not_hps.pt"
    torch.save({"state_dict": state}, broken)
    with pytest.raises(ScorerError, match=r"--hps .*not_hps\.pt: not a ViT-H-14-tiny checkpoint: 1 missing keys"):
        OpenClipScorer("hps", broken, str(config), "--hps")
    with pytest.raises(ScorerError, match=r"--hps .*nowhere\.pt: no such file"):
        OpenClipScorer("hps", tmp_path / "nowhere.pt", str(config), "--hps")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ScorerError, match=r"garbage\.pt: cannot read it as a checkpoint"):
        OpenClipScorer("hps", garbage, str(config), "--hps")
    with pytest.raises(ScorerError, match="not an open_clip model name"):
        OpenClipScorer("hps", checkpoint, "ViT-Q-99", "--hps")


def test_the_tiny_model_keeps_the_vit_h_14_layout():
    import open_clip

    real = open_clip.get_model_config("ViT-H-14")
    assert set(real) == set(TINY_H14) and set(real["vision_cfg"]) == set(TINY_H14["vision_cfg"])
    assert {k: real["vision_cfg"][k] for k in ("image_size", "patch_size")} == \
        {k: TINY_H14["vision_cfg"][k] for k in ("image_size", "patch_size")}
    assert real["text_cfg"]["vocab_size"] == TINY_H14["text_cfg"]["vocab_size"]


def test_a_hugging_face_clip_folder_gives_the_clip_score(tmp_path, images):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from comfyui_mole.trainer.benchmarks.scorers import HFClipScorer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<|pad|>": 2}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(tmp_path)
    config = CLIPConfig(text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path)
    scorer = HFClipScorer(tmp_path)
    items = [(images[0], "a woman waving"), (images[1], "a man")]
    values = scorer.score(items)
    assert values == HFClipScorer(tmp_path).score(items) and all(0 <= v <= 100 for v in values)
    with pytest.raises(ScorerError, match="not a Hugging Face CLIP folder"):
        HFClipScorer(tmp_path / "nothing")


def test_a_planted_better_model_wins_under_a_real_scorer(hps, tmp_path):
    """Per prompt, the planted model's image is the one the scorer prefers among candidates that include the
    reference model's image: it must win every pair, with an interval above zero."""
    from comfyui_mole.trainer.benchmarks.evaluate import score
    from comfyui_mole.trainer.benchmarks.summary import summarise

    config, checkpoint = hps
    scorer = OpenClipScorer("hps", checkpoint, str(config), "--hps")
    rng = np.random.default_rng(3)
    prompts = ["a woman waving", "a man with a dog", "two kids playing", "a girl smiling", "a person reading",
               "an old man"]
    table = []
    for i, prompt in enumerate(prompts):
        candidates = []
        for j in range(4):
            path = tmp_path / f"{i}_{j}.png"
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
            candidates.append(path)
        scores = scorer.score([(p, prompt) for p in candidates])
        best = int(np.argmax(scores))
        reference = 0 if best != 0 else 1           # the reference model drew another candidate
        for model, k in (("reference", reference), ("planted", best)):
            table.append({"model": model, "repeat": i % 2, "prompt_id": i, "seed": 10 + i, "prompt": prompt,
                          "image": candidates[k].name, "hps": ""})
    score(tmp_path, table, [lambda: scorer], ["hps"])           # the evaluation's own scoring pass
    assert (tmp_path / "scores.csv").read_text().count("\n") == 13
    summary = summarise(table, ["reference", "planted"], ["hps"], "reference", "planted")
    v = summary["models"]["planted"]["hps"]["vs_reference"]
    assert v["win_rate"] == 1.0 and v["ci95"][0] > 0 and v["pairs"] == 6
