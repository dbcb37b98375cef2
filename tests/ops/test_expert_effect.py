"""expert-effect (the precondition for gates) on a planted expert: a stand-in base whose one expert layer acts per
latent cell and errs on face cells, and an expert that reads a marker only the face region's cells carry and
corrects that error, so it changes the face cells alone; the measure finds it there and nowhere else, and the
verdict passes it under the name face and fails it under the name hand."""
import numpy as np
import torch
from torch import nn

from comfyui_mole.mole_ops.expert_file import ExpertFile, LoRAWeights
from comfyui_mole.mole_ops.layout import UNetLayout
from comfyui_mole.trainer.training import expert_effect
from comfyui_mole.trainer.training.model import ddpm_alphas_cumprod

SIZE, CELLS = 32, 4                 # 32 px images, 4x4 latent cells of 8x8 px
KEY = "lora_unet_input_blocks_1_1_proj_in"


class StandInBase:
    """The base's interface for measure(): one Linear (4 -> 4 channels) at a real layer key, applied per cell,
    that adds -1 to every channel of face cells (it reads the marker: the latent of an image is channel 0 = 10
    inside its face mask, 0 elsewhere)."""

    def __init__(self, faces: dict[str, np.ndarray]):
        self.layout = UNetLayout("stand-in", (1,), (1,), -1, (0, 0))
        self.model = nn.Module()
        self.model.diffusion_model = nn.Module()
        self.model.diffusion_model.input_blocks = nn.ModuleList([nn.Identity(), nn.ModuleList([nn.Identity(),
                                                                                              nn.Module()])])
        self.layer = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.layer.weight.zero_()
            self.layer.weight[:, 0] = -0.1
        self.model.diffusion_model.input_blocks[1][1].proj_in = self.layer
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.faces = faces

    def encode_images(self, pixels):
        # the test's images carry their face mask in the red channel
        face = torch.nn.functional.adaptive_avg_pool2d(pixels[..., 0][:, None], CELLS)[:, 0] >= 0.5
        latent = torch.zeros(pixels.shape[0], 4, CELLS, CELLS)
        latent[:, 0] = 10.0 * face
        return latent

    def encode_text(self, captions, size):
        return None

    def noisy(self, x0, noise, t):
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict(self, x_t, t, cond):
        b = x_t.shape[0]
        tokens = x_t.flatten(2).transpose(1, 2)                     # (B, cells, 4)
        return self.layer(tokens).transpose(1, 2).reshape(b, 4, CELLS, CELLS)


def pictures(tmp_path, n=4):
    from PIL import Image

    out = []
    for i in range(n):
        face = np.zeros((SIZE, SIZE), bool)
        face[:16, 8 * (i % 3):8 * (i % 3) + 16] = True                 # 2x2 cells
        hand = np.zeros((SIZE, SIZE), bool)
        hand[24:, 16:] = True                                         # 1x2 cells
        pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
        pixels[..., 0] = face * 255
        path = tmp_path / f"p{i}.png"
        Image.fromarray(pixels).save(path)
        out.append(expert_effect.Picture(path, "a picture", {"face": face, "hand": hand}))
    return out


def planted(name):
    down = torch.zeros(1, 4)
    down[0, 0] = 1.0                       # reads the face marker
    up = torch.full((4, 1), 0.1)           # adds +1 on face cells: undoes the base's error there
    return ExpertFile(name, {KEY: LoRAWeights(down, up, 1.0, False)})


def test_a_planted_expert_is_found_on_its_region_and_nowhere_else(tmp_path):
    base = StandInBase({})
    pics = pictures(tmp_path)
    result = expert_effect.measure(base, [planted("face"), planted("hand")], pics, timesteps=(5, 1), seed=0, batch=3)
    assert result["regions"] == ["face", "hand", "background"]
    assert result["cells"] == {"face": 4 * 4, "hand": 2 * 4, "background": 16 * 4 - 16 - 8}
    assert abs(result["base"]["1"]["face"] - 2.0) < 0.3 and abs(result["base"]["1"]["hand"] - 1.0) < 0.3
    for expert in ("face", "hand"):
        mean = result["delta"][expert]["mean"]
        assert -1.1 < mean["face"] < -0.9                     # the base's +1 of squared error on face cells, undone
        assert abs(mean["hand"]) < 0.02 and abs(mean["background"]) < 0.02
    verdicts = expert_effect.verdicts(result)
    face = verdicts["face"]
    assert {k: face[k] for k in ("own", "holds", "passes")} == {"own": "face", "passes": True,
                                                                "holds": {"5": True, "1": True, "mean": True}}
    assert verdicts["hand"]["own"] == "hand" and not verdicts["hand"]["passes"]   # it helps faces, not hands
    # the margin (smallest other region's delta minus the own region's) and its interval over pictures
    assert 0.9 < face["margin"] < 1.1 and 0 < face["margin_ci95"][0] <= face["margin"] <= face["margin_ci95"][1]
    assert -1.1 < verdicts["hand"]["margin"] < -0.9 and verdicts["hand"]["margin_ci95"][1] < 0
    assert "margin +" in expert_effect.verdict_lines(result)[0] and "within the noise" not in "".join(
        expert_effect.verdict_lines(result))
    md = expert_effect.write(result, tmp_path / "out")
    assert "| face | mean |" in md.read_text() and (tmp_path / "out" / "expert_effect.png").stat().st_size > 1000


def test_read_pictures_pairs_masks_by_stem(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    (images / "masks").mkdir(parents=True)
    for stem in ("a", "b"):
        Image.new("RGB", (16, 16)).save(images / f"{stem}.png")
        (images / f"{stem}.caption").write_text(f"picture {stem}")
    Image.new("L", (16, 16), 255).save(images / "masks" / "a_face.png")
    Image.new("L", (16, 16), 0).save(images / "masks" / "a_left_hand.png")
    got = expert_effect.read_pictures(images, images / "masks")
    assert [p.image.stem for p in got] == ["a", "b"] and sorted(got[0].masks) == ["face", "left_hand"]
    assert got[0].masks["face"].all() and not got[0].masks["left_hand"].any() and got[1].masks == {}


def test_held_out_errors_reuse_the_encodings_they_are_given(tmp_path):
    """Several models on one checkpoint (the in-world evaluation): the pictures are encoded once, and the maps are
    the same as without the cache."""
    from comfyui_mole.trainer.training.evaluation import held_out_cell_errors

    base = StandInBase({})
    calls = []
    encode = base.encode_images
    base.encode_images = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    pics = [(p.image, p.caption) for p in pictures(tmp_path, n=5)]
    plain = held_out_cell_errors(base, pics, seed=3, repeats=2, batch=2)
    assert calls == [2, 2, 1]
    encoded = {}
    first = held_out_cell_errors(base, pics, seed=3, repeats=2, batch=2, encoded=encoded)
    second = held_out_cell_errors(base, pics, seed=3, repeats=2, batch=2, encoded=encoded)
    assert calls == [2, 2, 1] * 2 and len(encoded) == 3
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(plain, first, second))


def test_a_margin_within_noise_is_said_so_and_old_results_have_no_interval(tmp_path):
    """Two pictures where the expert helps its region on one and hurts it on the other: the margin's interval
    spans 0 and the verdict says so; a result written before per-picture sums were kept gets no interval."""
    regions = ["face", "background"]
    result = {"regions": regions, "delta": {"face": {"1": {"face": -0.1, "background": 0.0},
                                                     "mean": {"face": -0.1, "background": 0.0}}},
              "per_picture": {"counts": [[2, 2], [2, 2]],
                              "sums": {"base": {"1": [[1.0, 1.0], [1.0, 1.0]]},
                                       "face": {"1": [[0.2, 1.0], [1.4, 1.0]]}}}}
    v = expert_effect.verdicts(result)["face"]
    assert v["passes"] and v["margin_ci95"][0] < 0 < v["margin_ci95"][1]
    assert "within the noise" in expert_effect.verdict_lines(result)[0]
    del result["per_picture"]
    assert expert_effect.verdicts(result)["face"]["margin_ci95"] is None
    assert "margin +0.10000 (" in expert_effect.verdict_lines(result)[0]


def _planted_result(hand_on_face: list[list[float]]) -> dict:
    """Two experts on four pictures (regions face, hand, background; 2 cells each, base error 1 per cell): the face
    expert lowers face cells to 0.2 and leaves the rest; the hand expert lowers hand cells to 0.2 and sets face cells'
    summed error per picture from `hand_on_face`."""
    regions = ["face", "hand", "background"]
    base = [[2.0, 2.0, 2.0]] * 4
    face = [[0.4, 2.0, 2.0]] * 4
    hand = [[f, 0.4, 2.0] for (f,) in hand_on_face]

    def mean(sums):
        totals = np.asarray(sums).sum(axis=0) / 8 - 1.0
        return dict(zip(regions, totals.tolist()))
    delta = {"face": {"1": mean(face), "mean": mean(face)}, "hand": {"1": mean(hand), "mean": mean(hand)}}
    return {"regions": regions, "delta": delta,
            "per_picture": {"counts": [[2, 2, 2]] * 4, "sums": {"base": {"1": base}, "face": {"1": face},
                                                                "hand": {"1": hand}}}}


def test_the_cross_effect_says_whether_a_gate_has_a_reason_to_close_an_expert():
    """An expert that hurts the other part gives a gate a reason to close it there; one that helps both does not
    (and its share of its own help is reported); one within the noise is said to be."""
    hurts = expert_effect.cross_effects(_planted_result([[3.0], [3.2], [2.8], [3.0]]))
    assert hurts["hand"]["parts"]["face"]["effect"] == "hurts" and hurts["hand"]["reason_to_close"]
    assert hurts["hand"]["parts"]["face"]["ci95"][0] > 0 and hurts["hand"]["parts"]["face"]["share"] < 0
    assert hurts["face"]["parts"]["hand"]["effect"] == "none" and not hurts["face"]["reason_to_close"]
    helps = _planted_result([[1.2], [1.0], [1.4], [1.2]])
    c = expert_effect.cross_effects(helps)["hand"]
    assert c["parts"]["face"]["effect"] == "helps" and not c["reason_to_close"]
    assert abs(c["parts"]["face"]["share"] - 0.5) < 1e-9          # face cells 1 -> 0.6, hand cells 1 -> 0.2
    lines = expert_effect.cross_effect_lines(helps)
    assert any(line.startswith("- hand expert on face: -0.40000 [") and "50% of its change on hand" in line
               and "nothing pushes a gate to close it there" in line for line in lines), lines
    noisy = expert_effect.cross_effects(_planted_result([[1.0], [3.0], [1.0], [3.0]]))["hand"]["parts"]["face"]
    assert noisy["effect"] == "none" and noisy["ci95"][0] < 0 < noisy["ci95"][1]
    del helps["per_picture"]
    assert expert_effect.cross_effects(helps)["hand"]["parts"]["face"] == {
        "delta": -0.4, "ci95": None, "share": 0.5, "effect": "helps"}


def test_close_ups_as_whole_pictures(tmp_path):
    """Each expert's change on each kind of close-up as one whole-picture region: the planted face expert helps the
    pictures that hold its marker; an expert that hurts the other kind gives a global gate a reason to close it."""
    base = StandInBase({})
    pics = expert_effect.whole_pictures(pictures(tmp_path))
    assert all(list(p.masks) == [expert_effect.WHOLE] and p.masks[expert_effect.WHOLE].all() for p in pics)
    measured = expert_effect.measure(base, [planted("face")], pics, timesteps=(5, 1), seed=0, batch=3)
    assert measured["regions"] == [expert_effect.WHOLE, "background"] and measured["cells"]["background"] == 0
    hurting = {"regions": [expert_effect.WHOLE, "background"],
               "delta": {"face": {"1": {expert_effect.WHOLE: 0.5}, "mean": {expert_effect.WHOLE: 0.5,
                                                                         "background": float("nan")}}},
               "per_picture": {"counts": [[4, 0]] * 3, "sums": {"base": {"1": [[4.0, 0.0]] * 3},
                                                               "face": {"1": [[5.8, 0.0], [6.0, 0.0], [6.2, 0.0]]}}}}
    effects = expert_effect.closeup_effects({"face": measured, "hand": hurting})
    assert effects["face"]["face"]["effect"] == "helps" and effects["face"]["face"]["delta"] < -0.2
    assert effects["face"]["hand"]["effect"] == "hurts" and effects["face"]["hand"]["ci95"][0] > 0
    lines = expert_effect.closeup_lines({"face": measured, "hand": hurting})
    assert lines[0].startswith("- face expert on face close-ups (whole pictures): -") and "its own kind" in lines[0]
    assert "a global gate has a reason to close it on them" in lines[1]
