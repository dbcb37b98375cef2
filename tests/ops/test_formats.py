"""Expert, gate and pack files: round trips, the authors' layout, validation, and every error message."""

import re

import pytest
import torch
from mole_fakes import SD15_DIMS, SDXL_DIMS, fake_expert, fake_gates, layer_shapes
from safetensors.torch import save_file

from comfyui_mole.mole_ops import expert_file, gate_file, pack_file, safetensors_io
from comfyui_mole.mole_ops.errors import FormatError, MismatchError
from comfyui_mole.mole_ops.layout import SD15, SDXL, detect_layout, reads_text_tokens
from comfyui_mole.mole_ops.mixture import build, check_gates


@pytest.fixture(scope="module")
def sd15_shapes():
    return layer_shapes(SD15, **SD15_DIMS)


def test_layouts_count_the_spec_layers():
    assert len(SD15.layer_keys) == 192 and len(SDXL.layer_keys) == 722
    assert sum(reads_text_tokens(k) for k in SD15.layer_keys) == 32
    assert SD15.name_map["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == \
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert SD15.name_map["lora_unet_up_blocks_3_attentions_2_proj_out"] == "diffusion_model.output_blocks.11.1.proj_out"
    assert SDXL.name_map["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("naming", ["diffusers", "sgm", "diffusion_model"])
def test_expert_round_trip(tmp_path, sd15_shapes, dtype, naming):
    e = fake_expert("face", sd15_shapes, rank=4, alpha=2.0, naming=naming, layout=SD15, dtype=dtype)
    sha = expert_file.save(tmp_path / "face.safetensors", e, family="SD1.5", steps=7)
    back = expert_file.load(tmp_path / "face.safetensors", "face")
    assert back.sha256 == sha == back.metadata["sshs_model_hash"]
    assert back.metadata["ss_network_dim"] == "4" and back.metadata["ss_base_model_version"] == "sd_v1"
    assert back.metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert set(back.layers) == set(e.layers) and len(back.layers) == 192
    for k, w in e.layers.items():
        b = back.layers[k]
        assert b.down.dtype == dtype and torch.equal(b.down, w.down) and torch.equal(b.up, w.up)
        assert b.alpha == 2.0 and b.conv == w.conv
    assert detect_layout(back.layers, "x") is SD15


def test_expert_conv_layers_are_stored_as_1x1_kernels(tmp_path, sd15_shapes):
    e = fake_expert("hand", sd15_shapes, naming="diffusers", layout=SD15)
    expert_file.save(tmp_path / "h.safetensors", e)
    tensors, _, _ = safetensors_io.read(tmp_path / "h.safetensors")
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 320, 1, 1)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].shape == (320, 4, 1, 1)


def test_missing_alpha_means_alpha_equals_rank(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": torch.ones(3, 5), "lora_unet_x.lora_up.weight": torch.ones(2, 3)},
              str(tmp_path / "a.safetensors"))
    assert expert_file.load(tmp_path / "a.safetensors", "face").layers["lora_unet_x"].alpha == 3.0


def _write(tmp_path, tensors, name="bad.safetensors", metadata=None):
    save_file(tensors, str(tmp_path / name), metadata=metadata)
    return tmp_path / name


EXPERT_ERRORS = [
    ({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.hada_w1_a": torch.ones(2)}, "not kohya LoRA keys"),
    ({"lora_unet_x.lora_down.weight": torch.ones(2, 4)}, "lacks lora_unet_x.lora_up.weight"),
    ({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(3, 5)},
     "do not chain"),
    ({"lora_unet_x.lora_down.weight": torch.ones(2, 4, 3, 3), "lora_unet_x.lora_up.weight": torch.ones(3, 2, 1, 1)},
     "not LoCon 3x3"),
    ({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(3, 2),
      "lora_unet_x.alpha": torch.ones(2)}, "expected a scalar"),
    ({"lora_te_text_model_x.lora_down.weight": torch.ones(2, 4), "lora_te_text_model_x.lora_up.weight":
      torch.ones(3, 2)}, "UNet-only"),
    ({"lora_unet_x.lora_down.weight": torch.full((2, 4), float("nan")), "lora_unet_x.lora_up.weight":
      torch.ones(3, 2)}, "NaN or infinite"),
]


@pytest.mark.parametrize("tensors,message", EXPERT_ERRORS)
def test_expert_errors_name_file_and_problem(tmp_path, tensors, message):
    path = _write(tmp_path, tensors)
    with pytest.raises(FormatError, match=message) as err:
        expert_file.load(path, "face")
    assert str(path) in str(err.value)


def test_unreadable_files_are_refused_with_the_reason(tmp_path, sd15_shapes):
    good = tmp_path / "good.safetensors"
    expert_file.save(good, fake_expert("face", {k: v for k, v in list(sd15_shapes.items())[:4]}))
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        expert_file.load(truncated, "face")
    pickle = tmp_path / "model.ckpt"
    torch.save({"a": torch.ones(1)}, pickle)
    with pytest.raises(FormatError, match="pickle checkpoint .* is refused"):
        expert_file.load(pickle, "face")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a model file at all")
    with pytest.raises(FormatError, match="not a safetensors file"):
        expert_file.load(text, "face")
    with pytest.raises(FormatError, match="no such file"):
        expert_file.load(tmp_path / "missing.safetensors", "face")
    with pytest.raises(FormatError, match="expert name 'face.v2'"):
        expert_file.load(good, "face.v2")


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("n", [1, 3])
def test_gate_round_trip_n_experts(tmp_path, sd15_shapes, variant, n):
    shapes = dict(list(sd15_shapes.items())[:24])
    experts = [fake_expert(name, shapes, seed=i) for i, name in enumerate(["face", "hand", "feet"][:n])]
    gates = fake_gates(experts, variant)
    gates.expert_info = {e.name: {"rank": 4, "alpha": 2.0, "sha256": "x"} for e in experts}
    gates.base_model = "SD1.5"
    gate_file.save(tmp_path / "g.safetensors", gates)
    back = gate_file.load(tmp_path / "g.safetensors")
    assert back.variant == variant and back.experts == gates.experts and back.base_model == "SD1.5"
    assert back.expert_info == gates.expert_info
    for k, g in gates.layers.items():
        b = back.layers[k]
        assert all(torch.equal(x, y) for x, y in zip((b.local_w, b.local_b, b.global_w, b.global_b),
                                                     (g.local_w, g.local_b, g.global_w, g.global_b)))


@pytest.mark.parametrize("layout,dims,count,params", [(SD15, SD15_DIMS, 1152, 0.85e6), (SDXL, SDXL_DIMS, 4332, 5.32e6)])
def test_authors_gate_layout_loads_and_validates(tmp_path, layout, dims, count, params):
    shapes = layer_shapes(layout, **dims)
    naming = "diffusers" if layout is SD15 else "sgm"
    experts = [fake_expert(n, shapes, rank=1, naming=naming, layout=layout, seed=i)
               for i, n in enumerate(["face", "hand"])]
    gates = fake_gates(experts)
    tensors = gates.tensors()  # the authors' files have no metadata
    assert len(tensors) == count
    assert abs(sum(t.numel() for t in tensors.values()) - params) / params < 0.01
    assert all(k.startswith("moe_lora_unet_") for k in tensors)
    path = tmp_path / "gates.safetensors"
    save_file({k: v.to(torch.bfloat16 if layout is SDXL else torch.float32) for k, v in tensors.items()}, str(path))
    back = gate_file.load(path)
    assert back.experts == ("face", "hand") and back.variant == "official"
    report = check_gates(back, experts)
    assert not report.errors and not report.warnings
    mole = build(experts, back)
    assert len(mole.keys) == len(layout.layer_keys)


def test_pack_round_trip(tmp_path, sd15_shapes):
    shapes = dict(list(sd15_shapes.items())[:12])
    experts = [fake_expert(n, shapes, seed=i) for i, n in enumerate(["face", "hand"])]
    gates = fake_gates(experts)
    pack_file.save(tmp_path / "p.safetensors", experts, gates)
    back_experts, back_gates = pack_file.load(tmp_path / "p.safetensors")
    assert [e.name for e in back_experts] == ["face", "hand"] and back_gates.experts == ("face", "hand")
    for e, b in zip(experts, back_experts):
        assert all(torch.equal(e.layers[k].down, b.layers[k].down) for k in e.layers)
    assert not check_gates(back_gates, back_experts, SD15).errors
    with pytest.raises(FormatError, match="not a MoLE pack"):
        pack_file.load(_write(tmp_path, gates.tensors(), "g.safetensors"))
    with pytest.raises(FormatError, match="not the gates' column order"):
        pack_file.save(tmp_path / "q.safetensors", experts[::-1], gates)


def test_gate_file_errors(tmp_path, sd15_shapes):
    shapes = dict(list(sd15_shapes.items())[:4])
    experts = [fake_expert(n, shapes, seed=i) for i, n in enumerate(["face", "hand"])]
    good = fake_gates(experts).tensors()
    one = next(iter(good)).split(".softmoe.")[0]
    cases = [
        ({**good, "lora_unet_x.lora_down.weight": torch.ones(1)}, {}, "not gate keys"),
        ({k: v for k, v in good.items() if k != f"{one}.softmoe.hand_scale.bias"}, {}, "missing"),
        ({**good, f"{one}.softmoe.Phi_1.weight": torch.ones(3, 320)}, {}, r"Phi_1 has weight \(3, 320\)"),
        ({k.replace("face_scale", "feet_scale"): v for k, v in good.items()}, {}, "not the authors'"),
        (good, {"mole.experts": "face,hand"}, "metadata mole.experts should be a JSON list of expert names"),
        (good, {"mole.variant": "softmax"}, "not 'official' or 'paper'"),
        ({**good, f"{one}.softmoe.face_scale.weight": torch.ones(2, 320)}, {}, "expected \\(1, d_out\\)"),
    ]
    for tensors, metadata, message in cases:
        path = _write(tmp_path, tensors, metadata=metadata or None)
        with pytest.raises(FormatError, match=message) as err:
            gate_file.load(path)
        assert str(path) in str(err.value)


def test_gate_validation_reports_every_mismatch(sd15_shapes):
    shapes = dict(list(sd15_shapes.items())[:12])
    experts = [fake_expert(n, shapes, seed=i) for i, n in enumerate(["face", "hand"])]
    gates = fake_gates(experts)
    assert "same names in the same order" in check_gates(gates, experts[::-1]).errors[0]
    partial = fake_gates([fake_expert(n, dict(list(shapes.items())[:6])) for n in ["face", "hand"]])
    assert "expert layers have no gates" in check_gates(partial, experts, SD15).errors[0]
    wide = fake_gates([fake_expert(n, {k: (d + 1, o, c) for k, (d, o, c) in shapes.items()}) for n in ["face", "hand"]])
    assert "gates expect d_in" in check_gates(wide, experts, SD15).errors[0]
    gates.expert_info = {"face": {"rank": 8, "alpha": 2.0, "sha256": "abc"}}
    experts[0].sha256 = "def"
    report = check_gates(gates, experts, SD15)
    assert "rank 8" in report.errors[0] and "sha256 differs" in report.warnings[0]
    with pytest.raises(MismatchError, match="does not fit the experts"):
        build(experts, gates, SD15)


def test_sdxl_expert_on_sd15_layout_is_named(sd15_shapes):
    sdxl = fake_expert("face", dict(list(layer_shapes(SDXL, **SDXL_DIMS).items())[:40]), rank=1)
    with pytest.raises(MismatchError, match="do not exist in a SD1.5 UNet"):
        build([sdxl], layout=SD15)
    assert build([sdxl]).layout is SDXL


def test_pack_and_writer_errors(tmp_path, sd15_shapes):
    shapes = dict(list(sd15_shapes.items())[:4])
    experts = [fake_expert(n, shapes, seed=i) for i, n in enumerate(["face", "hand"])]
    pack = tmp_path / "p.safetensors"
    pack_file.save(pack, experts, fake_gates(experts))
    tensors, metadata, _ = safetensors_io.read(pack)
    stray = _write(tmp_path, {**tensors, "other.x": torch.ones(1)}, "stray.safetensors", metadata)
    with pytest.raises(FormatError, match="a pack holds only"):
        pack_file.load(stray)
    orphan = _write(tmp_path, {**tensors, "expert.feet.lora_unet_x.alpha": torch.ones(())}, "o.safetensors", metadata)
    with pytest.raises(FormatError, match="not listed in mole.pack_experts"):
        pack_file.load(orphan)
    broken = _write(tmp_path, tensors, "b.safetensors", {**metadata, "mole.pack_experts": "face"})
    with pytest.raises(FormatError, match="b.safetensors: metadata mole.pack_experts should be a JSON list"):
        pack_file.load(broken)
    unnamed = _write(tmp_path, tensors, "u.safetensors", {k: v for k, v in metadata.items()
                                                          if k != "mole.pack_experts"})
    with pytest.raises(FormatError, match="u.safetensors: pack metadata mole.pack_experts is missing"):
        pack_file.load(unnamed)
    with pytest.raises(FormatError, match="metadata must be strings"):
        safetensors_io.write(tmp_path / "m.safetensors", {"a": torch.ones(1)}, {"steps": 3})
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("key,value,expected", [
    ("mole.experts", "null", r"a JSON list of expert names \(strings\)"),     # issue 31: raw TypeErrors before
    ("mole.experts", "5", r"a JSON list of expert names \(strings\)"),
    ("mole.experts", "[1, 2]", r"a JSON list of expert names \(strings\)"),
    ("mole.pack_experts", "null", r"a JSON list of expert names \(strings\)"),
    ("mole.pack_experts", "[1, 2]", r"a JSON list of expert names \(strings\)"),
    ("mole.expert_info", "[1]", "a JSON object of JSON objects"),
    ("mole.expert_metadata", "{\"face\": 3}", "a JSON object of JSON objects"),
])
def test_metadata_of_the_wrong_json_type_is_a_clear_error(tmp_path, sd15_shapes, key, value, expected):
    """Metadata that is valid JSON of another type names the file, the key, what it found and what it expected
    (these raised a raw TypeError: "'NoneType' object is not iterable")."""
    shapes = dict(list(sd15_shapes.items())[:4])
    experts = [fake_expert(n, shapes, seed=i) for i, n in enumerate(["face", "hand"])]
    gates = fake_gates(experts)
    if key in ("mole.pack_experts", "mole.expert_metadata"):
        good, load = pack_file.save(tmp_path / "p.safetensors", experts, gates), pack_file.load
    else:
        good, load = gate_file.save(tmp_path / "g.safetensors", gates), gate_file.load
    tensors, metadata, _ = safetensors_io.read(good)
    path = _write(tmp_path, tensors, "typed.safetensors", {**metadata, key: value})
    with pytest.raises(FormatError, match=rf"typed.safetensors: metadata {key} should be {expected}, found "
                                          rf"'{re.escape(value)}'"):
        load(path)


@pytest.mark.parametrize("metadata,expected", [
    ({"mole.format_version": "[1,2]"}, r"metadata mole.format_version is '\[1,2\]'; this version of ComfyUI-MoLE "
                                       r"reads gate files of format '1'"),
    ({"mole.expert_info": '{"face": {"rank": "8"}}'}, r"metadata mole.expert_info\['face'\].rank should be an integer, "
                                                      r'found "8"'),
    ({"mole.expert_info": '{"hand": {"alpha": true}}'},
     r"metadata mole.expert_info\['hand'\].alpha should be a number"),
    ({"mole.expert_info": '{"hand": {"sha256": 5}}'},
     r"metadata mole.expert_info\['hand'\].sha256 should be a hex string"),
])
def test_each_metadata_key_has_one_declared_type(tmp_path, sd15_shapes, metadata, expected):
    """issue 31: a format version of another type or value, and expert_info fields of the wrong type (check_gates
    would have raised a raw ValueError at Apply time), are clear errors when the file is read."""
    shapes = dict(list(sd15_shapes.items())[:4])
    gates = fake_gates([fake_expert(n, shapes, seed=i) for i, n in enumerate(["face", "hand"])])
    tensors, good, _ = safetensors_io.read(gate_file.save(tmp_path / "g.safetensors", gates))
    path = _write(tmp_path, tensors, "typed.safetensors", {**good, **metadata})
    with pytest.raises(FormatError, match=rf"typed.safetensors: {expected}"):
        gate_file.load(path)


def test_mixture_refuses_unpairable_experts(sd15_shapes):
    shapes = dict(list(sd15_shapes.items())[:6])
    face = fake_expert("face", shapes)
    with pytest.raises(MismatchError, match="unique"):
        build([face, fake_expert("face", shapes)], layout=SD15)
    with pytest.raises(MismatchError, match="cover different layers"):
        build([face, fake_expert("hand", dict(list(shapes.items())[:3]))], layout=SD15)
    with pytest.raises(MismatchError, match="no experts"):
        build([], layout=SD15)
    with pytest.raises(MismatchError, match="fit neither SD1.5 nor SDXL"):
        detect_layout(["lora_unet_nothing_here"], "x")
    with pytest.raises(MismatchError, match="gate variant 'soft'"):
        build([face], layout=SD15, variant="soft")


@pytest.mark.parametrize("header_bytes", [640, 896, 1152, 1408])
def test_a_safetensors_header_whose_length_reads_as_pickle_magic_loads(tmp_path, header_bytes):
    """A header of 640 bytes begins with 0x80 0x02, a pickle's magic: it is still a safetensors file."""
    import struct

    from safetensors.torch import save

    for pad in range(0, 1400):
        blob = save({"a.lora_down.weight": torch.ones(2, 4), "a.lora_up.weight": torch.ones(4, 2)},
                    {"x": "y" * pad})
        if struct.unpack("<Q", blob[:8])[0] == header_bytes:
            break
    else:
        pytest.fail(f"no padding gives a {header_bytes}-byte header")
    assert blob[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    path = tmp_path / "lora.safetensors"
    path.write_bytes(blob)
    assert expert_file.load(path, "face").ranks == {2}
