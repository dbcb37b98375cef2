"""The trainer's noise schedule, Min-SNR weighting and learning-rate schedules against SPEC.md section 5."""
import pytest
import torch

from comfyui_mole.trainer.training.config import TrainConfig
from comfyui_mole.trainer.training.model import ddpm_alphas_cumprod, min_snr_weight
from comfyui_mole.trainer.training.optim import make_scheduler


def test_scaled_linear_schedule():
    abar = ddpm_alphas_cumprod()
    assert abar.shape == (1000,)
    assert abar[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert abar[-1].item() == pytest.approx(torch.prod(1 - betas).item(), rel=1e-5)
    assert (abar[1:] < abar[:-1]).all()


def test_min_snr_weight_for_epsilon_prediction():
    abar = ddpm_alphas_cumprod()
    t = torch.tensor([0, 200, 500, 999])
    snr = abar[t] / (1 - abar[t])
    w = min_snr_weight(abar, t, 5.0)
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / snr)
    assert w[0] < 0.01 and w[-1] == 1.0          # low noise (huge SNR) down-weighted, high noise unchanged


def _rates(config: TrainConfig, steps: int) -> list[float]:
    """The learning rate of the first `steps` steps under `config`'s schedule (base rate 1)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(config, opt)
    seen = []
    for _ in range(steps):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("name,expect", [
    ("constant", [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    ("constant_with_warmup", [0, 0.5, 1, 1, 1, 1, 1, 1, 1, 1]),
    ("linear", [0, 0.5, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
])
def test_lr_schedules(name, expect):
    c = TrainConfig(learning_rate=1.0, lr_scheduler=name, lr_warmup_steps=0 if name == "constant" else 2,
                    max_train_steps=10)
    assert _rates(c, 10) == pytest.approx(expect)


def test_cosine_ends_at_zero():
    c = TrainConfig(learning_rate=1.0, lr_scheduler="cosine", max_train_steps=4)
    assert _rates(c, 5) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0])


def test_masked_loss_of_ones_is_the_plain_loss_and_masked_cells_send_no_gradient():
    from comfyui_mole.trainer.training.loop import denoising_loss, latent_mask

    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 4, 6, 8, generator=gen).requires_grad_(True)
    noise = torch.randn(2, 4, 6, 8, generator=gen)
    plain = denoising_loss(eps, noise)
    assert torch.equal(denoising_loss(eps, noise, torch.ones(2, 1, 6, 8)), plain)
    pixels = torch.zeros(48, 64)
    pixels[:, 32:] = 1.0                                  # learn the right half only
    pixels[:8, 28:32] = 1.0                               # half of one 8x8 cell: that cell weighs 0.5
    mask = latent_mask(pixels, (6, 8))
    assert mask.shape == (1, 6, 8) and mask[0, 0, 3] == 0.5 and mask[0, 1, 3] == 0 and (mask[0, :, 4:] == 1).all()
    denoising_loss(eps, noise, mask.expand(2, 1, 6, 8)).sum().backward()
    assert (eps.grad[..., 1:, :4] == 0).all() and (eps.grad[..., :4] != 0).sum() == 2 * 4 * 1  # the sliver's cell
    assert (eps.grad[..., 4:] != 0).all()


def test_cosine_with_restarts_restarts_num_cycles_times():
    c = TrainConfig(learning_rate=1.0, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2,
                    max_train_steps=8)
    assert _rates(c, 9) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 1.0, 0.8535534, 0.5, 0.1464466, 0.0])


def test_huber_and_smooth_l1_losses_as_kohya_writes_them():
    from comfyui_mole.trainer.training.loop import denoising_loss, huber_threshold

    noise = torch.zeros(2, 1, 1, 1)
    small, large = torch.full((2, 1, 1, 1), 0.01), torch.full((2, 1, 1, 1), 10.0)
    c = torch.tensor([0.1, 0.1])
    l2 = denoising_loss(small, noise)
    # huber: 2c(sqrt(d^2 + c^2) - c): like l2 for small errors, 2c|d| for large ones
    assert denoising_loss(small, noise, loss_type="huber", huber_c=c) == pytest.approx(l2, rel=1e-2)
    assert denoising_loss(large, noise, loss_type="huber", huber_c=c) == pytest.approx(2 * 0.1 * (10.0 - 0.1),
                                                                                        rel=1e-3)
    assert denoising_loss(large, noise, loss_type="smooth_l1", huber_c=c) == pytest.approx(2 * (10.0 - 0.1),
                                                                                            rel=1e-3)
    abar = ddpm_alphas_cumprod()
    t = torch.tensor([0, 999])
    assert huber_threshold(0.1, "constant", t, abar).tolist() == pytest.approx([0.1, 0.1])
    assert huber_threshold(0.1, "exponential", t, abar).tolist() == pytest.approx([1.0, 0.1], rel=1e-2)
    snr = huber_threshold(0.1, "snr", t, abar)
    assert 0.1 < snr[1] < snr[0] <= 1.0               # from about 1 at t=0 down towards huber_c at the noisy end


# -- v-prediction and zero terminal SNR (kohya's --v_parameterization, --zero_terminal_snr) -------------------------
def test_zero_terminal_snr_against_the_papers_algorithm():
    """Lin et al. 2023, algorithm 1, written through the betas as kohya does."""
    from comfyui_mole.trainer.training.model import zero_terminal_snr

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    root = torch.cumprod(1 - betas, 0).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alphas = torch.cat([root[:1] ** 2, root[1:] ** 2 / root[:-1] ** 2])
    reference = torch.cumprod(alphas, 0)
    abar = zero_terminal_snr(ddpm_alphas_cumprod())
    torch.testing.assert_close(abar, reference.float(), atol=1e-6, rtol=1e-5)
    assert abar[-1] == 0 and abar[0] == pytest.approx(1 - 0.00085, rel=1e-6) and (abar[1:] < abar[:-1]).all()


def test_v_target_recovers_the_clean_latent_and_min_snr_weights_v_as_kohya():
    from types import SimpleNamespace

    from comfyui_mole.trainer.training.model import Base, zero_terminal_snr

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 300, 700, 999])
    for abar in (ddpm_alphas_cumprod(), zero_terminal_snr(ddpm_alphas_cumprod())):
        base = SimpleNamespace(alphas_cumprod=abar, v_prediction=True)
        x_t, v = Base.noisy(base, x0, noise, t), Base.target(base, x0, noise, t)
        a = abar[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)
    assert Base.target(SimpleNamespace(alphas_cumprod=abar, v_prediction=False), x0, noise, t) is noise
    abar = ddpm_alphas_cumprod()
    snr = abar[t] / (1 - abar[t])
    torch.testing.assert_close(min_snr_weight(abar, t, 5.0, v_prediction=True), torch.clamp(snr, max=5.0) / (snr + 1))
    w = min_snr_weight(zero_terminal_snr(abar), t, 5.0, v_prediction=True)
    assert torch.isfinite(w).all() and w[-1] == 0        # pure noise at the last step: weight 0, not a NaN


def test_cosine_half_periods_from_lr_scheduler_args():
    """kohya passes --lr_scheduler_args to the schedule: cosine's num_cycles counts half-periods (0.5: one decay)."""
    c = TrainConfig(learning_rate=1.0, lr_scheduler="cosine", max_train_steps=4, lr_scheduler_args=["num_cycles=1"])
    assert _rates(c, 5) == pytest.approx([1.0, 0.5, 0.0, 0.5, 1.0])
    c = TrainConfig(learning_rate=1.0, lr_scheduler="cosine", max_train_steps=4, lr_scheduler_args=["num_cycles=0.5"])
    assert _rates(c, 5) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0])
