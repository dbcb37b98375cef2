"""MoLE's tensors under ComfyUI's memory management (tiny model, real ModelPatcher and sampler): one MoLE and one
frozen stack for every Apply MoLE on the same files, loaded, counted and offloaded by ComfyUI as a model of its
own, in the dtype the op computes in."""
import pytest
import torch

from host_utils import sample
from mole_fakes import fake_gates, make_mole

SETTINGS = (("both", 1.0, 1.0), ("both", 1.0, 0.0), ("both", 0.0, 1.0), ("local", 1.0, 1.0), ("global", 1.0, 1.0))


@pytest.fixture
def files(tiny, tmp_path):
    """Two experts and their gates for the tiny model, written and loaded back as the loader nodes do."""
    from comfyui_mole.mole_ops import expert_file, gate_file

    _, experts = make_mole(tiny, seed=len(str(tmp_path)))     # a new set of files per test: a MoLE of its own
    gates = fake_gates(experts, seed=3)
    for e in experts:
        expert_file.save(tmp_path / f"{e.name}.safetensors", e)
    gate_file.save(tmp_path / "gates.safetensors", gates)
    return (tuple(expert_file.load(tmp_path / f"{e.name}.safetensors", e.name) for e in experts),
            gate_file.load(tmp_path / "gates.safetensors"))


def apply(model, files, mode="both", face=1.0, hand=1.0):
    from comfyui_mole.nodes.apply import ApplyMoLE

    experts, gates = files
    return ApplyMoLE.execute(model=model, experts=experts, mode=mode, strength_1=face, strength_2=hand,
                             strength_3=1.0, start_percent=0.0, end_percent=1.0, record_trace=False,
                             gates=gates).result[0]


def stacks_of(model):
    (patcher,) = model.get_additional_models_with_key("mole")
    return patcher


def test_five_apply_nodes_share_one_mole_and_one_stack(tiny, files):
    models = [apply(tiny, files, *s) for s in SETTINGS]
    moles = {id(m.get_attachment("mole").mole) for m in models}
    assert len(moles) == 1
    assert len({id(stacks_of(m).model) for m in models}) == 1          # one module of frozen stacks
    mole = models[0].get_attachment("mole").mole
    images = [sample(m) for m in models]
    assert all(not torch.equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])   # settings differ
    assert sum(mole.nbytes().values()) > 0 and mole.nbytes()["experts"] > 0
    frozen = [layer.frozen for layer in mole.layers.values()]
    assert all(f is not None for f in frozen) and list(stacks_of(models[0]).model) == frozen


def test_comfyui_loads_counts_uses_and_offloads_the_stacks(tiny, files, monkeypatch):
    """The stacks are a model in ComfyUI's list of loaded models while sampling, sized as MoLE counts them; the op
    computes with exactly those tensors; unloading moves them to the offload device (here a fake one, meta)."""
    import comfy.model_management as mm

    from comfyui_mole.mole_ops.ops import MoLELayer

    model = apply(tiny, files)
    stacks = stacks_of(model)
    mole = model.get_attachment("mole").mole
    used = []
    fused = MoLELayer.fused
    monkeypatch.setattr(MoLELayer, "fused", lambda self, *a: used.append(fused(self, *a)) or used[-1])
    sample(model)
    loaded = [lm for lm in mm.current_loaded_models if lm.model is not None and lm.model.model is stacks.model]
    assert len(loaded) == 1 and loaded[0].model_memory() == mole.nbytes()["frozen"] > 0
    in_module = {id(p) for p in stacks.model.parameters()}
    assert used and all(id(f.w1) in in_module for f in used)            # not a copy, not a cache of its own
    stacks.offload_device = torch.device("meta")
    mm.unload_all_models()
    assert not [lm for lm in mm.current_loaded_models if lm.model is not None and lm.model.model is stacks.model]
    assert {p.device.type for layer in mole.layers.values() for p in layer.frozen.parameters()} == {"meta"}


@pytest.mark.parametrize("native", [True, False])
def test_stacks_are_cached_in_the_dtype_the_op_computes_in(tiny, files, monkeypatch, native):
    """A bf16 model: on a device with bf16 units the stacks are bf16 (not fp32); without them fp32."""
    from comfyui_mole.mole_ops import ops

    monkeypatch.setattr(ops, "_native_half", lambda dtype: native)
    monkeypatch.setattr(tiny.model, "get_dtype", lambda: torch.bfloat16)
    model = apply(tiny, files)
    dtypes = {p.dtype for p in stacks_of(model).model.parameters()}
    assert dtypes == {torch.bfloat16 if native else torch.float32}


def test_other_files_get_another_mole(tiny, files, tmp_path):
    from comfyui_mole.mole_ops import expert_file
    from comfyui_mole.mole_ops.expert_file import ExpertFile, LoRAWeights

    experts, gates = files
    a = apply(tiny, files)
    assert apply(tiny, files).get_attachment("mole").mole is a.get_attachment("mole").mole
    changed = ExpertFile("face", {k: LoRAWeights(2 * w.down, w.up, w.alpha, w.conv)
                                  for k, w in experts[0].layers.items()})
    path = tmp_path / "other_face.safetensors"
    expert_file.save(path, changed)
    b = apply(tiny, ((expert_file.load(path, "face"), experts[1]), gates))
    assert b.get_attachment("mole").mole is not a.get_attachment("mole").mole
