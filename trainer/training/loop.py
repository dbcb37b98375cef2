"""The training loop shared by every stage: one readable step, in the order of the math.

    latents x_0 (VAE, cached or not)  ->  noise eps, timesteps t ~ U{0..999}  ->  x_t = sqrt(abar) x_0 + sqrt(1-abar) eps
    ->  eps_hat = UNet(x_t, t, text) with the stage's MoLE hooks  ->  loss = mean_CHW (eps_hat - eps)^2 (x Min-SNR weight;
        with --v_parameterization the target is v instead of eps)
    ->  backward (gradient accumulation)  ->  clip  ->  optimizer and schedule step  ->  log, sample, save

Everything random (data order, caption shuffles, flips, crops, colours, noise, timesteps, fresh weights, the
seed of each step's expert dropout) comes from one generator seeded by --seed, whose state is part of the saved
training state: a resumed run continues bitwise where the interrupted one stopped, step counter included.

Under torchrun every process runs this same loop on the same global batches and keeps its own rows of each
(dist.py); DistributedDataParallel averages the gradients, and rank 0 alone logs and writes files.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..harness.host import use_comfy
from . import state
from .config import ConfigError, TrainConfig
from .data import (Batch, BatchPlan, LatentCache, datasets_from_config, image_key, load_image, load_mask,
                   process_caption)
from .dist import World, peak_rss_mib
from .logbook import Logbook
from .optim import make_optimizer, make_scheduler

log = logging.getLogger("mole.trainer")


class Objective(torch.nn.Module):
    """What DistributedDataParallel wraps: the modules holding every trainable tensor, and as forward the
    stage's prediction (text encoding included, so a training text encoder's gradients are synchronised too).
    `encode` and `predict` are plain callables: the frozen rest of the model is not DDP's business."""

    def __init__(self, trainable: list[torch.nn.Module], encode, predict, precision: str, text_encoder_trains: bool):
        super().__init__()
        self.trainable = torch.nn.ModuleList(trainable)
        self.encode, self.predict = encode, predict
        self.precision, self.text_encoder_trains = precision, text_encoder_trains

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, captions: list[str], size: tuple[int, int]):
        # a frozen text encoder's (cached) encodings are computed in full precision; a training one autocasts
        with autocast(self.precision if self.text_encoder_trains else "no", x_t.device):
            cond = self.encode(captions, size)
        with autocast(self.precision, x_t.device):
            return self.predict(x_t, t, cond)


@contextlib.contextmanager
def compile_errors(config: TrainConfig):
    """With --torch_compile, a failure of torch.compile itself (no C++ compiler for inductor on a CPU, an operation
    the backend cannot compile) as a ConfigError that names the flags; other errors pass unchanged."""
    if not config.torch_compile:
        yield
        return
    import torch._dynamo.exc

    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--torch_compile (--dynamo_backend {config.dynamo_backend}) failed: {first[:400]}; train "
                          "without --torch_compile, or with another --dynamo_backend") from e


class Run:
    """One training run: the base, the stage, the data, the optimizer, and where it is."""

    def __init__(self, config: TrainConfig, world: World | None = None):
        from . import samples
        from .model import Base
        from .stages import STAGES

        self.config = config
        self.world = world or World.from_env()
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.datasets = datasets_from_config(config)           # fails fast, before the model loads
        self.plan = BatchPlan(self.datasets, processes=self.world.size)
        config = self.config = in_steps(config, len(self.plan))
        varying = [(s.captions_vary, s.image_dir) for d in self.datasets for s in d.subsets if s.captions_vary]
        if config.text_encoder_outputs_cached and varying:
            raise ConfigError(f"--cache_text_encoder_outputs: {varying[0][0]} (subset {varying[0][1]}) makes a new "
                              "caption every step, so nothing can be encoded up front; drop one of them")
        self.prompts = samples.parse_prompt_file(config.sample_prompts, config.size) if config.sample_prompts else []
        self.gen = torch.Generator().manual_seed(config.seed)
        use_comfy()
        self.base = Base(config.pretrained_model_name_or_path, config.clip_skip)
        if self.base.loaded_as_v and not config.v_parameterization:
            raise ConfigError(f"{config.pretrained_model_name_or_path}: ComfyUI loads this checkpoint as a "
                              "v-prediction model; give --v_parameterization (and --zero_terminal_snr if it was "
                              "trained so), or its training would teach it to predict the noise")
        if config.v_parameterization:
            self.base.predict_v(config.zero_terminal_snr)
            log.info("v-prediction%s: the UNet learns v = sqrt(abar) eps - sqrt(1 - abar) x_0",
                     " on the zero-terminal-SNR schedule" if config.zero_terminal_snr else "")
        if config.cache_text_encoder_outputs_to_disk:
            self.base.text_folder = self.out / "text_cache"
        self.stage = STAGES[config.stage](self.base, config, self.gen)
        if config.gradient_checkpointing:
            n = self.base.checkpoint_activations(text_encoder=bool(config.train_text_encoder))
            log.info("gradient checkpointing: %d layers", n)
        if config.torch_compile:
            self.base.compile_unet(config.dynamo_backend)
            log.info("--torch_compile: the UNet runs through torch.compile (backend %s); the first steps compile it",
                     config.dynamo_backend)
        objective = Objective(self.stage.modules(), self.text, self.base.predict, config.mixed_precision,
                              bool(config.train_text_encoder))
        self.model = self.world.wrap(objective, unused_parameters=bool(config.train_text_encoder))
        self.optimizer = make_optimizer(config, self.stage.param_groups())
        self.scheduler = make_scheduler(config, self.optimizer)
        self.cache = LatentCache(self.out / "latent_cache" if config.cache_latents_to_disk else None) \
            if config.latents_cached else None
        self.mask_cache: dict[tuple, torch.Tensor] = {}
        self.progress = state.Progress()
        self.readers = readers(config)
        self.norms: tuple[int, float, float] | None = None      # the last step's --scale_weight_norms figures

    # -- data ------------------------------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        p = self.progress
        if p.position >= len(p.order):
            p.order, p.position, p.epoch = self.plan.epoch(self.gen), 0, p.epoch + 1
        entry = p.order[p.position]
        p.position += 1
        return self.plan.make(entry, self.gen, p.epoch, p.step, self.config.max_train_steps)

    def latents(self, batch: Batch) -> torch.Tensor:
        """The batch's latents: from the cache, or read (by --max_data_loader_n_workers threads in parallel) and
        encoded one picture at a time (the same numbers however many threads read)."""
        out: list[torch.Tensor | None] = [None] * len(batch.images)
        todo = []
        for i, p in enumerate(batch.images):
            key = image_key(p.path, batch.size, p.flip, self.base.vae_id) if self.cache is not None else None
            out[i] = self.cache.get(key) if key else None
            if out[i] is None:
                todo.append((i, key))

        def read(i: int) -> torch.Tensor:
            p = batch.images[i]
            return load_image(p.path, batch.size, p.flip, p.crop, p.color)

        pixels = (self.readers.map if self.readers else map)(read, [i for i, _ in todo])
        for (i, key), image in zip(todo, pixels):
            out[i] = self.base.encode_images(image[None])[0].cpu()
            if key:
                self.cache.put(key, out[i])
        return torch.stack(out).to(self.base.device)

    def precache(self) -> None:
        """Encode every image (and its flip, where flip_aug) once, with a progress bar. Under torchrun each
        process encodes its share and the latents are exchanged, so every process holds all of them."""
        from .progress import bar

        jobs = {(path, d.size_of(i), flip) for d in self.plan.datasets for i, (path, _, s) in enumerate(d.items)
                for flip in ((False, True) if s.flip_aug else (False,))}
        mine = sorted(jobs, key=str)[self.world.rank::self.world.size]
        encoded = {}
        for path, size, flip in bar(mine, desc="caching latents", unit="img", disable=not self.world.main):
            key = image_key(path, size, flip, self.base.vae_id)
            if self.cache.get(key) is None:
                encoded[key] = self.base.encode_images(load_image(path, size, flip)[None])[0].cpu()
                self.cache.put(key, encoded[key])
        if self.world.distributed:
            for part in self.world.gather(encoded):
                for key, latent in part.items():
                    self.cache.memory.setdefault(key, latent)
        log.info("latents cached: %d encoded, %d reused", self.cache.misses, self.cache.hits)

    def loss_masks(self, batch: Batch, hw: tuple[int, int]) -> torch.Tensor:
        """(B, 1, h, w) loss weights of a batch at latent resolution (area-averaged, as kohya); ones for an image
        without a mask."""
        out = []
        for p, mask in zip(batch.images, batch.masks or [None] * len(batch.images)):
            key = (mask, batch.size, p.flip, p.crop, tuple(hw))
            if key not in self.mask_cache:
                full = torch.ones(batch.size[::-1]) if mask is None else \
                    load_mask(mask[0], mask[1], batch.size, p.flip, p.crop)
                self.mask_cache[key] = latent_mask(full, tuple(hw))
            out.append(self.mask_cache[key])
        return torch.stack(out).to(self.base.device)

    def text(self, captions: list[str], size: tuple[int, int]):
        # a training text encoder changes every step: its encodings are never cached
        return self.base.encode_text(captions, size, grad=bool(self.config.train_text_encoder)
                                     and torch.is_grad_enabled())

    def precache_text(self) -> None:
        """--cache_text_encoder_outputs: encode every caption once before training (kept for the whole run), with
        a progress bar; each process encodes its share and the encodings are exchanged under torchrun."""
        from .model import TEXT_CACHE
        from .progress import bar

        TEXT_CACHE.limit = None
        encoder, folder = self.base.text_encoder_id, self.base.text_folder
        # the captions as steps see them (prefix, suffix, first line: nothing random, see the check in __init__)
        steady = {id(s): replace(s, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)
                  for d in self.plan.datasets for s in d.subsets}
        dropped = any(s.caption_dropout_rate or s.caption_dropout_every_n_epochs
                      for d in self.plan.datasets for s in d.subsets)
        captions = sorted({process_caption(caption, steady[id(s)], torch.Generator())
                           for d in self.plan.datasets for _, caption, s in d.items} | ({""} if dropped else set()))
        mine, encoded = captions[self.world.rank::self.world.size], 0
        for caption in bar(mine, desc="caching text encoder outputs", unit="caption", disable=not self.world.main):
            if TEXT_CACHE.get(encoder, caption, folder) is None:
                TEXT_CACHE.put(encoder, caption, *self.base.encode_caption(caption), folder=folder)
                encoded += 1
        if self.world.distributed:
            for part in self.world.gather({c: TEXT_CACHE.get(encoder, c) for c in mine}):
                for caption, entry in part.items():
                    TEXT_CACHE.put(encoder, caption, *entry)
        encoded = sum(self.world.gather(encoded))
        log.info("text encoder outputs cached: %d captions, %d encoded, %d reused", len(captions), encoded,
                 len(captions) - encoded)

    # -- one optimizer step ----------------------------------------------------------------------------------
    def loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        """The loss of one global batch, noise and timesteps drawn from `gen` for all of its rows; this process
        computes only its rows, weighted so that the mean over processes is the batch mean (in one process: the
        batch mean)."""
        c = self.config
        n, (width, height) = len(batch.images), batch.size
        rows, factor = self.world.rows(n)
        # noise and timesteps of the whole global batch, the same in every process
        noise = torch.randn((n, self.base.latent_channels, height // 8, width // 8), generator=gen)
        # kohya's noise variants, each drawn only when on, so runs without them stay bitwise alike
        if c.noise_offset:
            noise = noise + c.noise_offset * torch.randn((n, self.base.latent_channels, 1, 1), generator=gen)
        if c.multires_noise_iterations:
            noise = pyramid_noise(noise, c.multires_noise_iterations, c.multires_noise_discount, gen)
        perturb = c.ip_noise_gamma * torch.randn(noise.shape, generator=gen) if c.ip_noise_gamma else None
        t = torch.randint(0, len(self.base.alphas_cumprod), (n,), generator=gen)
        if c.network_dropout:       # the experts' dropout draws from torch's generator, seeded from ours per step
            torch.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=gen)))
        mine = batch.rows(rows)
        x0 = self.latents(mine)
        noise, t = noise[rows].to(x0.device), t[rows].to(x0.device)
        # input perturbation: the noisy latent carries extra noise that the target (noise) does not
        x_t = self.base.noisy(x0, noise if perturb is None else noise + perturb[rows].to(x0.device), t)
        # prediction (the stage's hooks act inside the UNet)
        eps = self.model(x_t, t, mine.captions, mine.size)
        # loss per sample (only where the masks are white, with --masked_loss), optionally Min-SNR weighted; the
        # target is the noise (or v) without the input perturbation
        huber = None if c.loss_type == "l2" else \
            huber_threshold(c.huber_c, c.huber_schedule, t, self.base.alphas_cumprod.to(t.device))
        per_sample = denoising_loss(eps, self.base.target(x0, noise, t),
                                    self.loss_masks(mine, eps.shape[-2:]) if c.loss_masked else None,
                                    c.loss_type, huber)
        if c.min_snr_gamma:
            from .model import min_snr_weight

            per_sample = per_sample * min_snr_weight(self.base.alphas_cumprod.to(t.device), t, c.min_snr_gamma,
                                                     self.base.v_prediction)
        return per_sample.sum() / n * factor

    def step(self) -> tuple[float, int]:
        """One optimizer step; returns the global batch's loss (the mean over processes) and its sample count."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total, samples = 0.0, 0
        for micro in range(c.gradient_accumulation_steps):
            last = micro == c.gradient_accumulation_steps - 1
            sync = self.model.no_sync() if self.world.distributed and not last else contextlib.nullcontext()
            batch = self.next_batch()
            with sync, compile_errors(c):
                loss = self.loss(batch, self.gen) / c.gradient_accumulation_steps
                loss.backward()
            total += float(loss.detach())
            samples += len(batch.images)
        total = self.world.mean(total)
        if c.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.stage.parameters(), c.max_grad_norm)
        self.optimizer.step()
        if c.scale_weight_norms:
            self.norms = self.stage.max_norm(c.scale_weight_norms)
        self.scheduler.step()
        self.progress.step += 1
        return total, samples

    # -- the loop --------------------------------------------------------------------------------------------
    def train(self) -> Path:
        from .progress import bar

        c, world = self.config, self.world
        if self.cache is not None:
            self.precache()
        if c.text_encoder_outputs_cached:
            self.precache_text()
        if c.resume:
            self.resume(Path(c.resume))
        batch = self.plan.datasets[0].batch_size if self.plan.datasets else c.train_batch_size
        log.info("train-%s: %d process(es) x batch %d x accumulation %d = global batch %d", c.stage, world.size,
                 batch, c.gradient_accumulation_steps, world.size * batch * c.gradient_accumulation_steps)
        logbook = Logbook(self.out / f"{c.output_name}_log.csv", keep_until=self.progress.step)
        start, first, samples = time.monotonic(), self.progress.step, 0
        with torch.inference_mode(False), torch.enable_grad(), logbook if world.main else contextlib.nullcontext(), \
                bar(total=c.max_train_steps, initial=self.progress.step, desc=f"train-{c.stage}",
                     unit="step", disable=not world.main) as shown:
            while self.progress.step < c.max_train_steps:
                loss, n = self.step()
                samples += n
                step, lr = self.progress.step, self.scheduler.get_last_lr()[0]
                if world.main:
                    logbook.write(step, loss, lr, time.monotonic() - start)
                # kohya's progress-bar figures of --scale_weight_norms
                norms = {} if self.norms is None else {"keys_scaled": self.norms[0],
                                                       "avg_norm": f"{self.norms[1]:.3f}"}
                shown.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **norms)
                shown.update(1)
                if c.sample_every_n_steps and step % c.sample_every_n_steps == 0 and world.main:
                    self.sample(step)
                if c.save_every_n_steps and step % c.save_every_n_steps == 0 and step < c.max_train_steps:
                    self.save(step, intermediate=True)
        seconds = time.monotonic() - start
        final = self.save(self.progress.step, intermediate=False)
        peaks = world.gather(peak_rss_mib())
        if world.main:
            logbook.plot(self.out / f"{c.output_name}_loss.png", f"train-{c.stage} {c.output_name}")
            log.info("train-%s: %d steps in %.1f s, %.2f samples/s; peak memory %s MiB; wrote %s", c.stage,
                     self.progress.step - first, seconds, samples / max(seconds, 1e-9),
                     " + ".join(f"{p:.0f}" for p in peaks), final)
        return final

    def sample(self, step: int) -> None:
        from .samples import save_samples

        with torch.no_grad():
            save_samples(self.base, self.prompts, self.out / "sample", self.config.output_name, step)

    # -- files and states ------------------------------------------------------------------------------------
    def save(self, step: int, intermediate: bool) -> Path:
        """Rank 0 writes (the trained tensors are the same in every process); the others wait for it."""
        c = self.config
        name = f"{c.output_name}-step{step:08d}" if intermediate else c.output_name
        path = self.out / f"{name}.safetensors"
        if self.world.main:
            self.stage.save(path, step)
            if c.save_state and (intermediate or step == c.max_train_steps):
                state.save(self.out / f"{name}-state", self.stage.named_trainable(), self.optimizer,
                           self.scheduler, self.gen, self.progress, c.stage, c.seed, self.world.size)
        self.world.barrier()
        return path

    def resume(self, folder: Path) -> None:
        loaded = state.load(folder, self.config.stage, self.world.size)
        self.progress = state.restore(loaded, folder, self.stage.named_trainable(), self.optimizer, self.scheduler,
                                      self.gen)
        log.info("resumed from %s at step %d", folder, self.progress.step)


def readers(config: TrainConfig):
    """--max_data_loader_n_workers threads (at most the CPU count) that read a batch's pictures, or None."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    n = min(config.max_data_loader_n_workers or 0, os.cpu_count() or 1)
    if config.max_data_loader_n_workers and config.latents_cached:
        log.info("--max_data_loader_n_workers %d: no effect with --cache_latents (nothing is read while training)",
                 config.max_data_loader_n_workers)
        return None
    return ThreadPoolExecutor(n, thread_name_prefix="mole-reader") if n else None


def latent_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(H, W) pixel weights -> (1, h, w) at latent resolution, each cell the mean of its pixels (kohya: area)."""
    from .evaluation import cell_fractions

    return cell_fractions(mask, hw)[None]


def denoising_loss(eps: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None, loss_type: str = "l2",
                   huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample eps-MSE (or kohya's huber / smooth_l1 with a threshold per sample, `huber_c` (B,)), mean over
    C, H, W; with a mask (B, 1, h, w) every element is weighted by its cell's mask value first (kohya's masked
    loss: the mean still runs over all cells, so a half-masked image weighs half)."""
    diff = eps.float() - noise.float()
    if loss_type == "l2":
        error = diff ** 2
    else:
        c = huber_c.float().view(-1, 1, 1, 1)
        error = 2 * (torch.sqrt(diff ** 2 + c ** 2) - c)
        if loss_type == "huber":
            error = error * c
    if mask is not None:
        error = error * mask
    return error.mean(dim=(1, 2, 3))


def huber_threshold(huber_c: float, schedule: str, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """kohya's per-timestep huber_c: constant; exponential (from 1 at t=0 down to huber_c at the last timestep); snr
    (huber_c + (1 - huber_c) / (1 + sigma_t)^2, sigma_t = sqrt((1 - abar_t) / abar_t))."""
    if schedule == "constant":
        return torch.full(t.shape, huber_c)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / len(alphas_cumprod)
        return torch.exp(-alpha * t.float())
    abar = alphas_cumprod[t].float()
    sigma = ((1 - abar) / abar) ** 0.5
    return (1 - huber_c) / (1 + sigma) ** 2 + huber_c


def autocast(precision: str, device: torch.device):
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def in_steps(config: TrainConfig, batches_per_epoch: int) -> TrainConfig:
    """--max_train_epochs and --save_every_n_epochs as steps, as kohya counts them: an epoch is the global batches
    of one pass over the data / --gradient_accumulation_steps optimizer steps (rounded up)."""
    per_epoch = max(1, -(-batches_per_epoch // config.gradient_accumulation_steps))
    changes = {}
    if config.max_train_epochs:
        changes["max_train_steps"] = config.max_train_epochs * per_epoch
    if config.save_every_n_epochs:
        changes["save_every_n_steps"] = config.save_every_n_epochs * per_epoch
    if changes.get("max_train_steps", config.max_train_steps) <= config.lr_warmup_steps:
        raise ConfigError(f"--max_train_epochs {config.max_train_epochs} is {changes['max_train_steps']} steps, not more "
                          f"than --lr_warmup_steps {config.lr_warmup_steps}")
    if changes:
        log.info("epochs of %d step(s) (%d batches / accumulation %d): %s", per_epoch, batches_per_epoch,
                 config.gradient_accumulation_steps, ", ".join(f"--{k} {v}" for k, v in changes.items()))
    return replace(config, **changes) if changes else config


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, gen: torch.Generator) -> torch.Tensor:
    """kohya's multi-resolution noise: coarser random noise (each level 2-4x smaller, drawn from `gen`) upsampled
    and added with weight discount^i, then scaled back to unit standard deviation."""
    b, ch, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=gen)) * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn((b, ch, hn, wn), generator=gen)
        out = out + torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def train(config: TrainConfig) -> Path:
    run = Run(config)
    try:
        return run.train()
    finally:
        world = run.world
        if run.readers is not None:
            run.readers.shutdown()
        run.model = None                  # DistributedDataParallel lets go of the group before the group ends
        del run
        gc.collect()
        world.close()
