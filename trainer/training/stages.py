"""Stages choose what trains and what is written; the loop (loop.py) is shared.

- Stage 1 (`finetune`): every UNet weight trains, and with --train_text_encoder every text-encoder weight too
  (the VAE stays frozen); saved as a full single-file checkpoint through ComfyUI's own checkpoint writer.
- Stage 2 (`expert`): one LoRA of rank/alpha on kohya's target modules (SPEC.md section 2), UNet only, run as a
  one-expert MoLE at fixed scale through the `mole_ops` op; saved as a kohya LoRA (diffusers names for SD1.5, SGM
  names for SDXL, kohya metadata).
- Stage 3 (`gates`): the base and the experts frozen, only the gates train, through the very op the nodes use;
  saved as a gate file (and optionally a pack) with the experts' names, order and hashes.

A stage attaches its MoLE to the base model (keys `diffusion_model.…`) with forward hooks (`mole_ops.hooks`),
exposes its trainable parameters (`parameters()`, `param_groups()` for the optimizer, `named_trainable()` for
states), the modules that hold them (`modules()`, what DistributedDataParallel wraps), and writes its file with
`save(path, step)`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ...mole_ops import expert_file, gate_file, pack_file
from ...mole_ops.errors import MismatchError
from ...mole_ops.expert_file import ExpertFile, LoRAWeights
from ...mole_ops.gate_file import GateWeights
from ...mole_ops.fingerprint import METADATA_KEY
from ...mole_ops.hooks import HookState, attach
from ...mole_ops.layout import PREFIX, kohya_name
from ...mole_ops.mixture import build
from ...mole_ops.ops import GateSettings
from .config import TrainConfig
from .model import Base


SAVE_DTYPES = {"float": None, "fp16": torch.float16, "bf16": torch.bfloat16}     # --save_precision


class Stage:
    """Common part: a MoLE attached to base.unet by hooks, with the settings the forward uses. Every stage class
    names itself (`name`, the value of TrainConfig.stage), its command and a one-line summary; `STAGES` below is
    the one registry the configuration, the CLI and the loop read."""

    name: str
    command: str
    summary: str
    mole: nn.Module

    def __init__(self, base: Base, settings: GateSettings):
        self.base = base
        self.state = HookState(settings)
        self.handles = attach(base.model, self.mole, self.state)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        return [{"params": self.parameters()}]

    def modules(self) -> list[nn.Module]:
        return [self.mole]

    def named_trainable(self) -> dict[str, nn.Parameter]:
        ids = {id(p) for p in self.parameters()}
        return {n: p for n, p in self.mole.named_parameters() if id(p) in ids}

    def save(self, path: Path, step: int) -> Path:
        raise NotImplementedError


def kohya_names(base: Base) -> dict[str, str]:
    """{layer key: kohya name} in the naming kohya uses for this family (SD1.5 diffusers, SDXL SGM)."""
    if base.family == "SD1.5":
        return {k: kohya_name(p) for k, p in base.layout.paths.items()}
    return {k: kohya_name(k[len(PREFIX):]) for k in base.layout.layer_keys}


def fresh_expert(base: Base, name: str, rank: int, alpha: float, gen: torch.Generator) -> ExpertFile:
    """kohya's LoRA init: down like nn.Linear's default (kaiming uniform, a = sqrt(5)), up zero, so training
    starts exactly at the base."""
    modules = dict(base.unet.named_modules())
    layers = {}
    for key, kname in kohya_names(base).items():
        weight = modules[key[len(PREFIX):]].weight
        d_out, d_in = weight.shape[:2]
        bound = 1 / math.sqrt(d_in)        # kaiming_uniform(a=sqrt(5)) on (rank, d_in) = U(-1/sqrt(d_in), ...)
        down = (torch.rand(rank, d_in, generator=gen) * 2 - 1) * bound
        layers[kname] = LoRAWeights(down, torch.zeros(d_out, rank), float(alpha), weight.ndim == 4)
    return ExpertFile(name, layers)


class ExpertStage(Stage):
    """Stage 2: train one LoRA expert."""

    name, command, summary = "expert", "train-expert", "stage 2: train one LoRA expert (a kohya LoRA file)"

    def __init__(self, base: Base, config: TrainConfig, gen: torch.Generator):
        if config.network_weights:
            self.expert = expert_file.load(config.network_weights, config.expert_name)
        else:
            self.expert = fresh_expert(base, config.expert_name, config.network_dim, config.network_alpha, gen)
        self.config = config
        self.mole = build([self.expert], None, base.layout, trainable="experts")
        super().__init__(base, GateSettings("none", dropout=config.network_dropout or 0.0))

    def parameters(self) -> list[nn.Parameter]:
        return self.mole.expert_parameters()

    @torch.no_grad()
    def max_norm(self, limit: float) -> tuple[int, float, float]:
        """kohya's max-norm regularisation (--scale_weight_norms), after an optimizer step: a layer whose delta
        scale * up @ down has a Frobenius norm above `limit` gets up and down each scaled by sqrt(limit / norm), so
        the delta's norm is `limit`. Returns (layers scaled, mean norm, largest norm) after scaling."""
        scaled, norms = 0, []
        for _, layer in self.mole.items():
            lora = layer.experts[self.expert.name]
            norm = float((lora.up.float() @ lora.down.float()).norm()) * lora.scale
            ratio = min(norm, limit) / norm if norm > 0 else 1.0
            if ratio != 1.0:
                scaled += 1
                lora.up.mul_(ratio ** 0.5)
                lora.down.mul_(ratio ** 0.5)
            norms.append(norm * ratio)
        return scaled, sum(norms) / len(norms), max(norms)

    def current(self) -> ExpertFile:
        layers = {}
        for key, layer in self.mole.items():
            lora = layer.experts[self.expert.name]
            kname = self.mole.kohya_names[key]
            layers[kname] = LoRAWeights(lora.down.detach().clone(), lora.up.detach().clone(), lora.alpha,
                                        self.expert.layers[kname].conv)
        metadata = {**self.expert.metadata, METADATA_KEY: self.base.fingerprint}
        return ExpertFile(self.expert.name, layers, metadata)

    def save(self, path: Path, step: int) -> Path:
        expert = self.current()
        dtype = SAVE_DTYPES[self.config.save_precision]
        if dtype is not None:
            expert.layers = {k: LoRAWeights(w.down.to(dtype), w.up.to(dtype), w.alpha, w.conv)
                             for k, w in expert.layers.items()}
        expert_file.save(path, expert, family=self.base.family, steps=step,
                         comment=self.config.training_comment or
                         f"MoLE stage 2 expert {self.expert.name!r} on {self.base.path.name}")
        return path


class GateStage(Stage):
    """Stage 3: train the gates of frozen experts."""

    name, command = "gates", "train-gates"
    summary = "stage 3: train the gates of frozen experts (a gate file, optionally a pack)"

    def __init__(self, base: Base, config: TrainConfig, gen: torch.Generator):
        self.experts = [expert_file.load(path, name) for name, path in config.expert_paths().items()]
        gates = gate_file.load(config.gate_weights) if config.gate_weights else None
        if gates is None:
            # fresh gates with PyTorch's default init, drawn from the training generator (reproducible)
            with torch.random.fork_rng():
                torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
                self.mole = build(self.experts, None, base.layout, variant=config.gate_variant, trainable="gates")
        else:
            self.mole = build(self.experts, gates, base.layout, trainable="gates")   # the file brings its variant
        bases = {e.metadata.get(METADATA_KEY) for e in self.experts} - {None, ""}
        if bases and bases != {base.fingerprint}:
            raise MismatchError(f"the experts were trained on another base ({sorted(bases)}) than "
                                f"{base.path} ({base.fingerprint}); train the gates on the experts' base")
        self.config = config
        super().__init__(base, GateSettings("both"))

    def parameters(self) -> list[nn.Parameter]:
        return self.mole.gate_parameters()

    def save(self, path: Path, step: int) -> Path:
        gates = self.mole.export_gates(self.experts, base_model=self.base.fingerprint)
        dtype = SAVE_DTYPES[self.config.save_precision]
        if dtype is not None:
            gates.layers = {k: GateWeights(*(t.to(dtype) for t in (g.local_w, g.local_b, g.global_w, g.global_b)))
                            for k, g in gates.layers.items()}
        gates.metadata["mole.steps"] = str(step)
        if self.config.training_comment:
            gates.metadata["ss_training_comment"] = self.config.training_comment
        gate_file.save(path, gates)
        if self.config.save_pack:
            pack_file.save(Path(path).with_name(Path(path).stem + "_pack.safetensors"), self.experts, gates)
        return path


class FinetuneStage:
    """Stage 1: fine-tune the whole UNet, and the text encoder with --train_text_encoder (no hooks: the model's
    own weights train)."""

    name, command = "finetune", "train-base"
    summary = "stage 1: fine-tune the whole UNet (a full checkpoint)"

    def __init__(self, base: Base, config: TrainConfig, gen: torch.Generator):
        self.base = base
        self.config = config
        base.unet.requires_grad_(True)
        self.text_encoder = base.make_text_encoder_trainable() if config.train_text_encoder else None
        self.handles = []

    def detach(self) -> None:
        self.base.unet.requires_grad_(False)
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(False)

    def modules(self) -> list[nn.Module]:
        return [self.base.unet] + ([self.text_encoder] if self.text_encoder is not None else [])

    def param_groups(self) -> list[dict]:
        groups = [{"params": [p for p in self.base.unet.parameters() if p.requires_grad]}]
        if self.text_encoder is not None:
            lr = self.config.learning_rate_te or self.config.learning_rate
            groups.append({"params": [p for p in self.text_encoder.parameters() if p.requires_grad], "lr": lr})
        return groups

    def parameters(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups() for p in g["params"]]

    def named_trainable(self) -> dict[str, nn.Parameter]:
        out = {f"unet.{n}": p for n, p in self.base.unet.named_parameters()}
        if self.text_encoder is not None:
            out.update({f"text_encoder.{n}": p for n, p in self.text_encoder.named_parameters() if p.requires_grad})
        return out

    def save(self, path: Path, step: int) -> Path:
        """A full checkpoint (UNet, text encoder, VAE) in the single-file layout the stock loader reads. A
        v-prediction fine-tune carries ComfyUI's markers `v_pred` (and `ztsnr`), which its SDXL loader reads (an
        SD1.5 one is sampled through ModelSamplingDiscrete), and modelspec.prediction_type "v"."""
        import os

        import comfy.sd

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        marks = {} if not self.base.v_prediction else \
            {"v_pred": torch.tensor([]), **({"ztsnr": torch.tensor([])} if self.base.zsnr else {})}
        comfy.sd.save_checkpoint(str(tmp), self.base.patcher, self.base.clip, self.base.vae,
                                 metadata=checkpoint_metadata(self.base, self.config, step,
                                                              self.text_encoder is not None), extra_keys=marks)
        os.replace(tmp, path)
        return path


def checkpoint_metadata(base: Base, config: TrainConfig, step: int, text_encoder: bool) -> dict[str, str]:
    """modelspec (Stability AI's model metadata spec, as kohya writes it) and the run's MoLE facts."""
    import datetime

    width, height = config.size
    return {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1" if base.family == "SD1.5" else
            "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "diffusers" if base.family == "SD1.5" else
            "https://github.com/Stability-AI/generative-models",
            "modelspec.title": config.output_name,
            "modelspec.date": datetime.date.today().isoformat(),
            "modelspec.resolution": f"{width}x{height}",
            "modelspec.prediction_type": "v" if base.v_prediction else "epsilon",
            "modelspec.description": f"MoLE stage 1 fine-tune of {base.path.name}, {step} steps",
            "mole.stage": "1", "mole.steps": str(step), "mole.text_encoder_trained": str(text_encoder).lower(),
            **({"ss_training_comment": config.training_comment} if config.training_comment else {})}


STAGES = {stage.name: stage for stage in (FinetuneStage, ExpertStage, GateStage)}
