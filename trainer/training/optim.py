"""Optimizers and learning-rate schedules by kohya's names."""
from __future__ import annotations

import math

import torch

from .config import ConfigError, TrainConfig


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = config.optimizer_kwargs()
    try:
        if config.optimizer_type == "AdamW":
            if "fused" in kwargs or "foreach" in kwargs:
                return torch.optim.AdamW(params, lr=config.learning_rate, **kwargs)
            # torch's default on a CPU is its per-tensor loop, which costs a stage-3 step (hundreds of small gate
            # tensors) 10 ms where the fused kernel takes 1.3 ms: fused wherever torch has it, else multi-tensor
            try:
                return torch.optim.AdamW(params, lr=config.learning_rate, fused=True, **kwargs)
            except RuntimeError:
                return torch.optim.AdamW(params, lr=config.learning_rate, foreach=True, **kwargs)
        if config.optimizer_type == "Lion":
            from lion_pytorch import Lion

            return Lion(params, lr=config.learning_rate, **kwargs)
        import bitsandbytes as bnb   # AdamW8bit; config validation checked a GPU and the package

        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, **kwargs)
    except TypeError as e:
        raise ConfigError(f"--optimizer_args {config.optimizer_args}: {config.optimizer_type} rejects them ({e})") from e


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """constant, constant_with_warmup, cosine, cosine_with_restarts (--lr_scheduler_num_cycles hard restarts) and
    linear (the decaying ones reach 0 at max_train_steps after the warm-up), as in diffusers' get_scheduler which
    kohya uses; cosine takes num_cycles from --lr_scheduler_args (half-periods; 0.5 decays once)."""
    warmup, total = config.lr_warmup_steps, config.max_train_steps
    half_periods = config.scheduler_kwargs().get("num_cycles", 0.5)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if config.lr_scheduler in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_scheduler == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((config.lr_scheduler_num_cycles * progress) % 1.0)))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * half_periods * min(progress, 1.0))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
