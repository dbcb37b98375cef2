"""Experts reduced to the rank they use (mole_ops/rank.py): exact at or above the true rank, error falling with the
rank, kohya's dynamic methods as kohya indexes them, gates that stay valid, resized files that load."""
import json

import pytest
import torch

from comfyui_mole.mole_ops import expert_file, mixture, rank
from comfyui_mole.mole_ops.errors import FormatError, MoLEError
from comfyui_mole.mole_ops.expert_file import ExpertFile, LoRAWeights
from comfyui_mole.mole_ops.ops import GateSettings, LoRA, MoLELayer
from comfyui_mole.mole_ops.rank import RankRule

from mole_fakes import fake_gates


def low_rank_layer(d_in, d_out, rank_nominal, true_rank, seed=0, decay=None, alpha=None):
    """A rank-`rank_nominal` LoRA pair whose product has rank `true_rank` (or, with `decay`, full rank with
    singular values decaying as decay ** i)."""
    gen = torch.Generator().manual_seed(seed)
    if decay is None:
        a = torch.randn(d_out, true_rank, generator=gen)
        b = torch.randn(true_rank, d_in, generator=gen)
        mix = torch.randn(true_rank, rank_nominal, generator=gen)
        up, down = a @ mix / rank_nominal, torch.linalg.pinv(mix) @ b
    else:
        qu, _ = torch.linalg.qr(torch.randn(d_out, rank_nominal, generator=gen))
        qd, _ = torch.linalg.qr(torch.randn(d_in, rank_nominal, generator=gen))
        s = decay ** torch.arange(rank_nominal, dtype=torch.float32)
        up, down = qu * s, qd.T
    return LoRAWeights(down.contiguous(), up.contiguous(), float(alpha if alpha is not None else rank_nominal / 2))


def delta(w: LoRAWeights) -> torch.Tensor:
    return (w.alpha / w.rank) * w.up.double() @ w.down.double()


def expert_of(layers: dict, name="face", sha="a" * 64) -> ExpertFile:
    return ExpertFile(name, layers, {"ss_training_comment": "trained"}, sha, f"/models/{name}.safetensors")


def test_parse_rules_and_labels():
    assert RankRule.parse("full").full and RankRule.parse("").full
    assert RankRule.parse("64") == RankRule("fixed", max_rank=64)
    assert RankRule.parse("99% energy") == RankRule("energy", 0.99)
    assert RankRule.parse("energy 0.95") == RankRule("energy", 0.95)
    for option in rank.NODE_OPTIONS:
        RankRule.parse(option)               # every node option parses
    assert RankRule.parse("99% energy").label() == "99% energy"
    for bad in ("0", "-3", "energy", "150% energy", "half"):
        with pytest.raises(MoLEError):
            RankRule.parse(bad)
    with pytest.raises(MoLEError, match="ratio must be >= 1"):
        RankRule("sv_ratio", 0.5)


@pytest.mark.parametrize("true_rank", [1, 5, 16])
def test_rank_at_or_above_the_true_rank_reproduces_the_expert(true_rank):
    w = low_rank_layer(96, 80, 16, true_rank)
    for k in (true_rank, true_rank + 3, 16, 40):
        out = rank.cut(w, min(k, 16))
        assert out.rank == min(k, 16)
        assert out.alpha / out.rank == pytest.approx(w.alpha / w.rank)        # kohya: the scale is kept
        err = (delta(out) - delta(w)).norm() / delta(w).norm()
        assert err < 2e-6, (k, float(err))
        assert rank.relative_error(w, out) < 2e-6


def test_the_error_falls_as_the_rank_rises_and_matches_the_singular_values():
    w = low_rank_layer(128, 96, 32, 32, decay=0.85)
    u, s, vh = rank.factor(w)
    errors = []
    for k in (1, 2, 4, 8, 16, 24, 32):
        out = rank.cut(w, k)
        measured = float((delta(out) - delta(w)).norm() / delta(w).norm())
        expected = float((s[k:].double().square().sum() / s.double().square().sum()).sqrt())
        assert measured == pytest.approx(expected, abs=1e-5)
        assert rank.relative_error(w, out) == pytest.approx(measured, abs=1e-5)
        errors.append(measured)
    assert all(a > b for a, b in zip(errors, errors[1:-1])) and errors[-1] < 1e-5


def test_energy_rule_keeps_the_fewest_values_for_the_share():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1])
    total = float((s ** 2).sum())
    for p in (0.5, 0.9, 0.99, 0.999, 1.0):
        k = RankRule("energy", p).keep(s, 5, 100)
        assert float((s[:k] ** 2).sum()) / total >= p - 1e-9
        if k > 1:
            assert float((s[:k - 1] ** 2).sum()) / total < p
    assert RankRule("energy", 0.99, max_rank=2).keep(s, 5, 100) == 2
    assert RankRule("fixed", max_rank=64).keep(s, 5, 100) == 5          # never above the layer's own rank


def kohya_rank(method, s, target, width, cap):
    """kohya's rank_resize, written from networks/resize_lora.py's formulas on the full singular values."""
    if method == "sv_ratio":
        index = int((s > s[0] / target).sum())
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(target, dtype=s.dtype))) + 1
    else:
        sq = s ** 2
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), torch.tensor(target ** 2, dtype=s.dtype))) + 1
    index = max(1, min(index, width - 1))
    return max(1, min(index + 1, cap))


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_fro", 0.99), ("sv_cumulative", 0.7),
                                          ("sv_ratio", 4.0), ("sv_ratio", 1000.0)])
def test_kohya_methods_keep_the_ranks_kohyas_script_keeps(method, param):
    w = low_rank_layer(64, 48, 24, 24, decay=0.8)
    full_s = torch.linalg.svdvals(w.up.double() @ w.down.double())       # kohya's SVD of the whole matrix
    u, s, vh = rank.factor(w)
    assert torch.allclose(s.double(), full_s[:24], rtol=1e-4, atol=1e-6)
    ours = RankRule(method, param, max_rank=24).keep(s, 24, 48)
    assert ours == kohya_rank(method, full_s, param, 48, 24)


def test_official_global_gate_folds_exactly_through_a_reduced_pair():
    torch.manual_seed(0)
    w = low_rank_layer(40, 56, 12, 12, decay=0.7)
    reduced = rank.cut(w, 5)
    layer = MoLELayer({"face": LoRA(reduced.down.double(), reduced.up.double(), reduced.alpha)}, ("face",)).double()
    x = torch.randn(2, 9, 40, dtype=torch.float64)
    r = (reduced.alpha / reduced.rank) * (x @ reduced.down.double().T) @ reduced.up.double().T     # R(X)
    g = layer.global_gate["face"]
    direct = r.mean(1) @ g.weight.T + g.bias                                 # w . mean_n(R(X)) + b
    v, b = layer.global_vectors(torch.float64)
    folded = (x @ v.T).mean(1) + b
    assert torch.allclose(folded, direct, atol=1e-12)
    # at the full rank the folded vector is the original expert's
    full = rank.cut(w, 12)
    original = MoLELayer({"face": LoRA(w.down.double(), w.up.double(), w.alpha)}, ("face",)).double()
    again = MoLELayer({"face": LoRA(full.down.double(), full.up.double(), full.alpha)}, ("face",)).double()
    again.load_state_dict(original.state_dict(), strict=False)
    with torch.no_grad():
        again.global_gate["face"].weight.copy_(original.global_gate["face"].weight)
    assert torch.allclose(again.global_vectors(torch.float64)[0], original.global_vectors(torch.float64)[0],
                          atol=1e-6)


def two_experts(rank_nominal=16, true_rank=6):
    layers = {f"lora_unet_layer_{i}": low_rank_layer(48, 40, rank_nominal, true_rank, seed=i, alpha=8)
              for i in range(3)}
    other = {k: low_rank_layer(48, 40, rank_nominal, true_rank, seed=10 + i, alpha=8)
             for i, k in enumerate(layers)}
    return expert_of(layers, "face", "a" * 64), expert_of(other, "hand", "b" * 64)


def test_reduce_is_cached_per_file_and_rule_and_records_its_source():
    face, _ = two_experts()
    rule = RankRule("energy", 0.99)
    a, b = rank.reduce(face, rule), rank.reduce(face, rule)
    assert a.layers is b.layers and a.sha256 == b.sha256 != face.sha256        # reduced once
    assert rank.reduce(face, RankRule()) is face
    assert a.source == {"sha256": face.sha256, "rank": 16, "alpha": 8.0, "rule": "99% energy"}
    assert a.origin_sha256 == face.sha256
    stats = a.reduction.stats
    assert set(stats.kept.values()) == {6} and max(stats.errors.values()) < 1e-5
    text = stats.summary("face")
    assert "rank 6 of 16" in text and "99% energy" in text and "error max" in text


def sd15_experts(rank_nominal=8, true_rank=3):
    from comfyui_mole.mole_ops.layout import SD15
    from mole_fakes import SD15_DIMS, fake_expert, layer_shapes

    shapes = dict(list(layer_shapes(SD15, **SD15_DIMS).items())[:4])
    experts = []
    for i, name in enumerate(("face", "hand")):
        e = fake_expert(name, shapes, rank=rank_nominal, alpha=4.0, seed=i)
        for w in e.layers.values():          # every layer of true rank `true_rank`
            w.up[:, true_rank:] = 0
        e.sha256 = f"{i}" * 64
        experts.append(e)
    gates = fake_gates(experts)
    gates.expert_info = mixture.expert_info(experts)
    return experts, gates


def test_gates_trained_on_the_full_experts_stay_valid_for_reduced_ones():
    experts, gates = sd15_experts()
    reduced = [rank.reduce(e, RankRule("fixed", max_rank=3)) for e in experts]
    assert {w.rank for e in reduced for w in e.layers.values()} == {3}
    report = mixture.check_gates(gates, reduced)
    assert report.errors == [] and report.warnings == []
    assert mixture.role_warnings(reduced, gates) == []
    # the checks read the source: gates of another rank, or another file, are still caught
    gates.expert_info["face"]["rank"] = 16
    assert "of rank 16, this one has rank [8] (reduced from rank 8)" in " ".join(mixture.check_gates(gates, reduced).errors)
    gates.expert_info["face"]["rank"] = 8
    gates.expert_info["hand"]["sha256"] = "c" * 64
    assert "not the file the gates were trained with" in " ".join(mixture.check_gates(gates, reduced).warnings)
    # swapped roles are found through the source hashes
    gates.expert_info["hand"]["sha256"] = experts[0].sha256
    assert any("swapped" in w for w in mixture.role_warnings(reduced, gates))
    assert "rank 3 of 8, alpha 4 (rank 3)" in mixture.rank_text(reduced[0])


def test_reduced_mixture_output_matches_full_at_the_true_rank():
    experts, gates = sd15_experts()
    full = mixture.build(experts, gates)
    reduced = [rank.reduce(e, RankRule("energy", 0.999999)) for e in experts]
    assert {w.rank for e in reduced for w in e.layers.values()} == {3}
    small = mixture.build(reduced, gates)
    for key, layer in full.items():
        conv = layer.d_in == layer.d_out and key.endswith(("proj_in", "proj_out"))
        x = torch.randn(2, layer.d_in, 4, 4) if conv else torch.randn(2, 16, layer.d_in)
        y = torch.randn(2, layer.d_out, 4, 4) if conv else torch.randn(2, 16, layer.d_out)
        with torch.no_grad():
            a = layer(x, y.clone(), GateSettings())
            b = small.layer(key)(x, y.clone(), GateSettings())
        assert (a - y).abs().max() > 1e-3                       # the experts act
        assert torch.allclose(a, b, atol=1e-5), key


def test_resized_file_records_kohyas_metadata_and_its_source(tmp_path):
    face, _ = two_experts()
    face.metadata.update(expert_file.kohya_metadata(face, "SD1.5", face.sha256))
    path = tmp_path / "face_r.safetensors"
    written = rank.write_resized(path, face, RankRule("sv_fro", 0.99, max_rank=16), dtype=torch.float16)
    loaded = expert_file.load(path, "face")
    assert loaded.sha256 == written.sha256 == loaded.metadata["sshs_model_hash"]
    assert loaded.source["sha256"] == face.sha256 and loaded.source["rank"] == 16
    assert loaded.metadata["ss_network_dim"] == "Dynamic" == loaded.metadata["ss_network_alpha"]
    assert loaded.metadata["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.99 from 16; ")
    assert json.loads(loaded.metadata["mole.resize_stats"])["kept"]
    assert next(iter(loaded.layers.values())).down.dtype == torch.float16
    fixed = rank.write_resized(tmp_path / "f.safetensors", face, RankRule("fixed", max_rank=4))
    meta = expert_file.load(tmp_path / "f.safetensors", "face").metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_training_comment"].startswith("dimension is resized from 16 to 4")
    assert fixed.ranks == {4}
    with pytest.raises(MoLEError, match="full rank"):
        rank.write_resized(tmp_path / "x.safetensors", face, RankRule())


@pytest.mark.parametrize("value", ["not json", "[]", '{"sha256": "zz", "rank": 4, "alpha": 1}',
                                   '{"sha256": "' + "a" * 64 + '", "rank": 0, "alpha": 1}',
                                   '{"sha256": "' + "a" * 64 + '", "rank": true, "alpha": 1}'])
def test_a_malformed_source_record_names_the_file_and_key(tmp_path, value):
    face, _ = two_experts()
    path = tmp_path / "bad.safetensors"
    from comfyui_mole.mole_ops import safetensors_io

    safetensors_io.write(path, face.tensors(), {expert_file.SOURCE_KEY: value})
    with pytest.raises(FormatError, match=r"bad\.safetensors: metadata mole\.resized_from should be"):
        expert_file.load(path, "face")


def test_five_loaders_with_one_setting_share_one_reduction_and_one_stack():
    experts, gates = sd15_experts()
    gates.sha256 = "g" * 64
    rule = RankRule.parse("99% energy")
    moles = []
    for _ in range(5):
        reduced = [rank.reduce(e, rule) for e in experts]
        moles.append(mixture.shared(reduced, gates, mixture.resolve_experts(experts, None)[0]))
    assert all(m is moles[0] for m in moles)
    other = mixture.shared([rank.reduce(e, RankRule.parse("64")) for e in experts], gates,
                           mixture.resolve_experts(experts, None)[0])
    assert other is not moles[0]


def test_the_reported_error_is_the_error_measured_on_the_stored_tensors():
    face, _ = two_experts(rank_nominal=16, true_rank=16)
    for text in ("99% energy", "90% energy", "8"):
        reduced = rank.reduce(face, RankRule.parse(text))
        for name, w in face.layers.items():
            measured = rank.relative_error(w, reduced.layers[name])
            assert reduced.reduction.stats.errors[name] == pytest.approx(measured, abs=1e-5)
