"""The fused gated-expert op against a naive reference written straight from SPEC.md section 3."""
import itertools

import pytest
import torch

from comfyui_mole.mole_ops.errors import MoLEError
from comfyui_mole.mole_ops.ops import MODES, GateSettings, LoRA, MoLELayer

NAMES = ("face", "hand", "feet", "eyes")


def make_layer(d_in, d_out, ranks, variant, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    experts = {}
    for name, r in zip(NAMES, ranks):
        down = torch.randn(r, d_in, generator=gen, dtype=dtype) / d_in ** 0.5
        up = torch.randn(d_out, r, generator=gen, dtype=dtype) / r ** 0.5
        experts[name] = LoRA(down.requires_grad_(False), up.requires_grad_(False), alpha=r / 2 + 1)
    torch.manual_seed(seed)
    layer = MoLELayer(experts, tuple(NAMES[:len(ranks)]), variant).to(dtype)
    with torch.no_grad():  # push gates away from 0.5 so every term matters
        for p in list(layer.local_gate.parameters()) + list(layer.global_gate.parameters()):
            p.mul_(4.0)
    return layer


def naive(layer: MoLELayer, x, y, settings: GateSettings):
    """out = F(X) + sum_i s_i L_i G_i R_i, with tokens as rows; one expert at a time."""
    conv = x.ndim == 4
    if conv:
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww).transpose(1, 2)
        y = y.reshape(b, y.shape[1], hh * ww).transpose(1, 2)
    out = y.clone()
    for i, name in enumerate(layer.order):
        s = settings.strength(name)
        if s == 0:
            continue
        e = layer.experts[name]
        r = e.scale * (x @ e.down.T) @ e.up.T                                   # (B, n, d_out)
        local = torch.sigmoid(x @ layer.local_gate.weight[i] + layer.local_gate.bias[i])   # (B, n)
        if layer.variant == "official":
            g = layer.global_gate[name]
            glob = torch.sigmoid(r.mean(dim=1) @ g.weight[0] + g.bias[0])                  # (B,)
        else:
            glob = torch.sigmoid(x.mean(dim=1) @ layer.global_gate.weight[i] + layer.global_gate.bias[i])
        if settings.mode in ("global", "none"):
            local = torch.ones_like(local)
        if settings.mode in ("local", "none"):
            glob = torch.ones_like(glob)
        out = out + s * local[..., None] * glob[:, None, None] * r
    if conv:
        out = out.transpose(1, 2).reshape(b, -1, hh, ww)
    return out


def inputs(layer, conv, shape, batch=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dtype = layer.local_gate.weight.dtype
    if conv:
        x = torch.randn(batch, layer.d_in, *shape, generator=gen, dtype=dtype)
        y = torch.randn(batch, layer.d_out, *shape, generator=gen, dtype=dtype)
    else:
        x = torch.randn(batch, shape[0] * shape[1], layer.d_in, generator=gen, dtype=dtype)
        y = torch.randn(batch, shape[0] * shape[1], layer.d_out, generator=gen, dtype=dtype)
    return x, y


CASES = list(itertools.product([False, True], [(4, 4), (3, 5)], [1, 2, 3, 4], ["official", "paper"], MODES))
# the three ways fused() stacks the weights: all folded and cached (nothing trains), cached expert stacks with
# the gates as their own matmul (stage 3), all folded and rebuilt per call (an expert trains)
TRAINING = ("nothing", "gates", "experts")


def set_training(layer, training):
    layer.requires_grad_(False)
    if training == "gates":
        for m in (layer.local_gate, layer.global_gate):
            m.requires_grad_(True)
    elif training == "experts":
        layer.experts.requires_grad_(True)


# low-rank experts run as down/up pairs; frozen experts whose ranks exceed the layer's width (SD1.5's 320-wide
# layers at rank 256) run as dense matrices (dense_pays)
RANKS = {"low": [4, 8, 3, 16], "dense": [40, 48, 36, 64]}


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("conv,shape,n_experts,variant,mode", CASES)
def test_fused_equals_naive_fp32(conv, shape, n_experts, variant, mode, training, ranks):
    layer = make_layer(24, 20, RANKS[ranks][:n_experts], variant, dtype=torch.float32)
    set_training(layer, training)
    dense = ranks == "dense" and training != "experts"
    assert (layer.fused(GateSettings(mode), "cpu", torch.float32).up is None) == dense
    settings = GateSettings(mode, {"hand": 0.7} if n_experts > 1 else {})
    x, y = inputs(layer, conv, shape)
    with torch.no_grad():
        expected = naive(layer, x, y, settings)
        got = layer(x, y.clone(), settings)
    assert not torch.allclose(expected, y, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert bool(layer._stacks) == (training == "gates") and (layer.frozen is not None) == (training == "nothing")


def test_fused_equals_naive_with_grad_enabled_and_cached_repeat():
    layer = make_layer(16, 12, [4, 6], "official")
    x, y = inputs(layer, False, (2, 3))
    settings = GateSettings("both")
    expected = naive(layer, x, y, settings)
    torch.testing.assert_close(layer(x, y.clone(), settings), expected)
    layer.requires_grad_(False)
    with torch.inference_mode():
        first = layer(x, y.clone(), settings)
        second = layer(x, y.clone(), settings)
    torch.testing.assert_close(first, expected)
    assert torch.equal(first, second) and not layer._stacks     # the training-time expert stacks are dropped
    assert layer.frozen is not None


def test_all_experts_off_returns_base_exactly():
    layer = make_layer(16, 12, [4, 6], "official")
    x, y = inputs(layer, True, (3, 5))
    out = layer(x, y, GateSettings("both", {"face": 0.0, "hand": 0.0}))
    assert out is y


@pytest.mark.parametrize("conv", [False, True])
def test_gates_at_zero_reproduce_the_base_exactly(conv):
    layer = make_layer(16, 12, [4, 6], "official", dtype=torch.float32)
    with torch.no_grad():
        layer.local_gate.bias.fill_(-1e4)   # sigmoid underflows to exactly 0 in fp32
    x, y = inputs(layer, conv, (3, 5))
    with torch.no_grad():
        out = layer(x, y.clone(), GateSettings("both"))
    assert torch.equal(out, y)


def test_one_expert_fixed_scale_equals_merged_lora():
    layer = make_layer(16, 12, [4], "official")
    e = layer.experts["face"]
    weight = torch.randn(12, 16, dtype=torch.float64)
    merged = weight + e.scale * e.up @ e.down
    x, _ = inputs(layer, False, (3, 3))
    with torch.no_grad():
        out = layer(x, x @ weight.T, GateSettings("none"))
    torch.testing.assert_close(out, x @ merged.T)


def test_batch_rows_are_pooled_separately():
    layer = make_layer(16, 12, [4, 6], "paper")
    x, y = inputs(layer, False, (2, 2), batch=3)
    with torch.no_grad():
        whole = layer(x, y.clone(), GateSettings("both"))
        row = layer(x[1:2], y[1:2].clone(), GateSettings("both"))
    torch.testing.assert_close(whole[1:2], row)


@pytest.mark.parametrize("ranks", [[2, 3], [10, 12]])          # low-rank and dense experts
@pytest.mark.parametrize("conv", [True, False])
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_gradients_reach_gates_only_and_match_numerics(variant, conv, ranks):
    layer = make_layer(6, 5, ranks, variant)
    layer.experts.requires_grad_(False)
    assert (layer.fused(GateSettings("both"), "cpu", torch.float64).up is None) == (ranks[0] == 10)
    x, y = inputs(layer, conv, (2, 3), batch=2)
    gates = [p for n, p in layer.named_parameters() if p.requires_grad]
    assert gates and all(not n.startswith("experts") for n, p in layer.named_parameters() if p.requires_grad)

    def loss(x, *params):     # the gates' gradient and the input's (what earlier layers' gates train through)
        saved = [p.detach().clone() for p in gates]
        names = [n for n, p in layer.named_parameters() if p.requires_grad]
        out = torch.func.functional_call(layer, dict(zip(names, params)), (x, y.clone(), GateSettings("both")))
        for p, v in zip(gates, saved):
            assert torch.equal(p, v)
        return out

    assert torch.autograd.gradcheck(loss, (x.clone().requires_grad_(True),)
                                    + tuple(p.detach().clone().requires_grad_(True) for p in gates))
    out = layer(x, y.clone(), GateSettings("both"))
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
    assert all(p.grad is None for p in layer.experts.parameters())


@pytest.mark.parametrize("mode", ["both", "local", "global"])
@pytest.mark.parametrize("strengths", [{}, {"hand": 0.6}, {"face": 0.0}])     # strengths 1 / not 1; an idle expert
@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("ranks", [[4, 4], [3, 5, 2], [10, 12]])          # equal, unequal, dense
@pytest.mark.parametrize("conv", [True, False])
def test_stage3_output_and_gradients_equal_the_naive_reference(ranks, conv, variant, strengths, mode):
    """Gates training on frozen experts (the global gate folded through the cached stacks), both variants, every
    gated mode, with strengths not 1 or an idle expert left out of the matmuls: the output and the gradients of the
    input and of every gate parameter equal autograd's through the naive reference."""
    layer = make_layer(6, 5, ranks, variant)
    set_training(layer, "gates")
    x, y = inputs(layer, conv, (2, 3), batch=2)
    settings = GateSettings(mode, strengths)
    gates = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for run in (lambda x: layer(x, y.clone(), settings), lambda x: naive(layer, x, y, settings)):
        xi = x.clone().requires_grad_(True)
        out = run(xi)
        grads = torch.autograd.grad(out.square().sum(), [xi] + gates, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [xi] + gates)]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ranks", [[4, 4], [3, 5], [10, 12]])                # equal, unequal, dense
@pytest.mark.parametrize("conv", [True, False])
def test_stage3_on_a_real_layers_output_chains_gradients_like_the_reference(ranks, conv):
    """In the model, y = F(X) is the wrapped layer's own output (a view, for a Linear on (B, n, d) input) and X
    reaches the loss through F and through the experts: every gradient (X's from both paths, added up by autograd,
    F's weight's, the gates') equals the reference's."""
    layer = make_layer(6, 5, ranks, "official")
    set_training(layer, "gates")
    torch.manual_seed(3)
    f = (torch.nn.Conv2d(6, 5, 1) if conv else torch.nn.Linear(6, 5)).to(torch.float64)
    x, _ = inputs(layer, conv, (2, 3), batch=2)
    params = [f.weight] + [p for p in layer.parameters() if p.requires_grad]
    results = []
    for run in (lambda x: layer(x, f(x), GateSettings("both")), lambda x: naive(layer, x, f(x), GateSettings("both"))):
        xi = x.clone().requires_grad_(True)
        hidden = torch.tanh(xi)                 # X itself comes out of an earlier op, as in the UNet
        out = run(hidden)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
                                    .sum(), [xi] + params)
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_bad_settings_and_shapes_are_refused():
    with pytest.raises(MoLEError, match="gate mode 'half'"):
        GateSettings("half")
    with pytest.raises(MoLEError, match="gate variant 'softmax'"):
        make_layer(4, 4, [2], "softmax")
    layer = make_layer(4, 4, [2], "official")
    with pytest.raises(MoLEError, match=r"must be \(B, n, d\) or \(B, C, H, W\)"):
        layer(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64), GateSettings())
    with pytest.raises(MoLEError, match="do not chain"):
        LoRA(torch.zeros(2, 4), torch.zeros(4, 3), 1.0)
    with pytest.raises(MoLEError, match="does not match experts"):
        MoLELayer({"face": LoRA(torch.zeros(2, 4), torch.zeros(4, 2), 1.0)}, ("hand",))


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_half_precision_activations_on_cpu(monkeypatch, native, conv):
    """bf16 activations: on a CPU without bf16 matrix units the experts run in fp32 (weights cached in fp32) and
    the sum is rounded once into the bf16 output; with such units they run in bf16. Either way the output is
    bf16 and matches the reference within bf16 precision."""
    from comfyui_mole.mole_ops import ops

    monkeypatch.setattr(ops, "_native_half", lambda dtype: native)
    layer = make_layer(32, 24, [8, 4], "official", dtype=torch.float32).requires_grad_(False)
    x, y = inputs(layer, conv, (4, 6))
    settings = GateSettings("both")
    expected = naive(layer, x, y, settings)
    with torch.inference_mode():
        got = layer(x.bfloat16(), y.bfloat16(), settings)
    assert got.dtype == torch.bfloat16
    assert layer.frozen.w1.dtype == (torch.bfloat16 if native else torch.float32)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=5e-2)
    if not native:     # fp32 experts: the only bf16 roundings are the inputs' and the output's
        exact = naive(layer, x.bfloat16().float(), y.bfloat16().float(), settings).bfloat16()
        assert (got.float() - exact.float()).abs().max() <= 2 * (exact.float().abs().max() * 2 ** -8)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        assert ops.compute_dtype(x.bfloat16()) == torch.bfloat16         # autocast decides inside autocast


def test_closed_gates_send_no_denormals_into_the_up_projection(monkeypatch):
    """sigmoid(-90) is a denormal float (x86 computes those ~10x slower): such gate factors become exactly 0."""
    layer = make_layer(16, 12, [4, 6], "official", dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():
        layer.local_gate.bias[0] = -90.0
        layer.local_gate.weight[0] = 0.0
    seen = []
    original = MoLELayer._scale_blocks
    monkeypatch.setattr(MoLELayer, "_scale_blocks", staticmethod(
        lambda hidden, coef, *rest: seen.append(coef) or original(hidden, coef, *rest)))
    x, y = inputs(layer, False, (2, 3))
    with torch.inference_mode():
        got = layer(x, y.clone(), GateSettings("both"))
    coef = seen[0]
    assert torch.all(coef[..., 0] == 0) and torch.all(coef[..., 1] > 0)
    assert not torch.any((coef != 0) & (coef.abs() < torch.finfo(torch.float32).tiny))
    torch.testing.assert_close(got, naive(layer, x, y, GateSettings("both")), rtol=1e-5, atol=1e-5)


def test_one_frozen_stack_serves_every_mode_and_strength():
    """Modes and strengths act on the per-token factors: the frozen stack is built once, holds every expert and
    both gates' rows, and every setting matches the reference from it."""
    layer = make_layer(24, 20, [4, 8, 3], "official", dtype=torch.float32).requires_grad_(False)
    x, y = inputs(layer, False, (3, 4))
    frozen = None
    for mode in MODES:
        for strengths in ({}, {"face": 0.0}, {"hand": 0.3, "feet": 2.0}):
            settings = GateSettings(mode, strengths)
            with torch.inference_mode():
                got = layer(x, y.clone(), settings)
            torch.testing.assert_close(got, naive(layer, x, y, settings), rtol=1e-5, atol=1e-5)
            frozen = frozen or layer.frozen
            assert layer.frozen is frozen
    assert frozen.w1.shape == (16 + 2 * 3 + 10, 24) and frozen.up.shape == (20, 15)   # 15 ranks, 6 gate rows, pad


def test_a_frozen_stack_elsewhere_is_copied_for_the_call_only():
    """A stack in another dtype or on another device (a host left it offloaded) is cast for one call."""
    layer = make_layer(24, 20, [4, 8], "official", dtype=torch.float32).requires_grad_(False)
    stack = layer.freeze(torch.float32)
    x, y = inputs(layer, False, (2, 3))
    settings = GateSettings("both", {"hand": 0.5})
    with torch.inference_mode():
        got = layer(x.double(), y.double(), settings)
    assert layer.frozen is stack and stack.w1.dtype == torch.float32
    torch.testing.assert_close(got.float(), naive(layer, x, y, settings), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [False, True])
def test_expert_dropout_drops_hidden_units_while_training_only(conv):
    """kohya's network_dropout: down(X) is dropped out (zeroed with probability p, the rest scaled by 1/(1-p))
    before up; under no_grad (sampling, the nodes) nothing is dropped. The reference draws the same mask from the
    same seed on a tensor of the hidden units' shape."""
    layer = make_layer(16, 12, [8], "official")
    set_training(layer, "experts")
    e = layer.experts["face"]
    x, y = inputs(layer, conv, (3, 4))
    settings = GateSettings("none", dropout=0.5)
    torch.manual_seed(7)
    out = layer(x, y, settings)
    tokens = x if not conv else x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
    hidden = tokens @ e.down.T                                                     # (B, n, r)
    torch.manual_seed(7)
    mask = torch.nn.functional.dropout(torch.ones_like(hidden), 0.5)
    delta = e.scale * (hidden * mask) @ e.up.T
    if conv:
        delta = delta.transpose(1, 2).reshape(y.shape)
    torch.testing.assert_close(out, y + delta)
    assert (mask == 0).any() and (mask == 2).any()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, y.clone(), settings), naive(layer, x, y, GateSettings("none")))
    with pytest.raises(MoLEError, match="expert dropout 1.0 is not in"):
        GateSettings("none", dropout=1.0)


class _MatmulWidths(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output width (columns) of every matrix product."""

    def __init__(self):
        super().__init__()
        self.widths = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.widths.append(out.shape[-1])
        return out


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("training", ("nothing", "gates"))
@pytest.mark.parametrize("strengths", [(1.0, 0.0, 0.0), (0.0, 0.7, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 1.0),
                                       (1.0, 0.0, 1.0)])
def test_idle_experts_are_not_computed_and_change_nothing(ranks, conv, training, strengths):
    """Experts at strength 0 before the first or after the last active one: their rows are not in any matmul
    (every product is as wide as the active experts, their gates, or the layer), and the output equals the naive
    reference with those strengths; one between two active ones is computed and multiplied by 0."""
    layer = make_layer(12 if ranks == "dense" else 24, 20, RANKS[ranks][:3], "official")
    set_training(layer, training)
    x, y = inputs(layer, conv, (3, 4))
    settings = GateSettings("both", dict(zip(layer.order, strengths)))
    with torch.no_grad():
        layer(x, y.clone(), settings)                      # build the stacks first
        with _MatmulWidths() as seen:
            out = layer(x, y.clone(), settings)
    torch.testing.assert_close(out, naive(layer, x, y, settings))
    active = [i for i, s in enumerate(strengths) if s]
    span = range(active[0], active[-1] + 1)
    dense = layer.fused(settings, x.device, x.dtype).up is None
    widths = [layer.d_out if dense else layer.experts[layer.order[i]].rank for i in span]
    everything = sum(layer.d_out if dense else e.rank for e in layer.experts.values())
    if len(span) == len(active):
        assert max(seen.widths) <= max(sum(widths), layer.d_out, 2 * len(span)), seen.widths
    else:                                           # the idle expert in the middle is computed
        assert max(seen.widths) >= everything, seen.widths
