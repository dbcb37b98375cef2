"""The base model for training, loaded with ComfyUI's own loader and run through ComfyUI's own UNet, so what is
trained is exactly what the nodes run; and the DDPM noise schedule of SD1.5/SDXL training (SPEC.md section 5).

Noising follows DDPM: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with scaled_linear betas 0.00085..0.012
over 1000 steps, epsilon prediction (or, with --v_parameterization, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0;
--zero_terminal_snr rescales abar so that abar_999 = 0), t uniform. ComfyUI's sampler feeds its UNet
x_sigma / sqrt(sigma^2 + 1) with sigma = sqrt((1 - abar) / abar), which is this same x_t, so the UNet is called here
with x_t and t directly.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ...mole_ops import safetensors_io
from ...mole_ops.errors import MoLEError
from ...mole_ops.fingerprint import fingerprint
from ...mole_ops.layout import UNetLayout

FAMILIES = {"SD15": "SD1.5", "SDXL": "SDXL"}
# CLIP-L's projection: no pooled output of CLIP-L is used (SD1.5 files do not even hold it; ComfyUI leaves it unset)
UNUSED_TEXT_TENSORS = {"clip_l.transformer.text_projection.weight"}


def ddpm_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (algorithm 1, as kohya's --zero_terminal_snr): sqrt(abar) shifted so that the last timestep's
    is 0 and scaled so that the first one's is unchanged."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return (((root - last) * first / (first - last)) ** 2).float()


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float,
                   v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-gamma: min(snr, gamma) / snr for epsilon prediction, min(snr, gamma) / (snr + 1) for v-prediction
    (as kohya), snr = abar / (1 - abar); per sample."""
    abar = alphas_cumprod[t]
    snr = abar / (1 - abar)
    return torch.clamp(snr, max=gamma) / (snr + 1 if v_prediction else snr)


@dataclass
class Conditioning:
    context: torch.Tensor          # (B, 77, D) text tokens
    y: torch.Tensor | None = None  # (B, adm) SDXL's pooled text + size embedding


class TextCache:
    """Text-encoder outputs (context (1, 77, D), pooled (1, P) or None) by text encoder id and caption, shared by
    every Base of the process: a stage-1 file whose text encoder did not train keeps its base's, so each caption is
    encoded once for all stages, evaluations and checks of one run. The least recently used entries are dropped
    beyond `limit` bytes (None: keep all, as --cache_text_encoder_outputs asks). With a folder, an entry is also
    kept there as one safetensors file (atomic writes), so a later run reuses it; a damaged or foreign file there
    is encoded again, never fatal."""

    def __init__(self, limit: int | None = 2 << 30):
        self.memory: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.limit, self.bytes = limit, 0
        self.hits = self.misses = 0
        self.saved: set[Path] = set()           # files written or read by this cache (not written again)

    @staticmethod
    def key(encoder_id: str, caption: str) -> str:
        return hashlib.sha256(f"{encoder_id}\0{caption}".encode()).hexdigest()[:32]

    def get(self, encoder_id: str, caption: str, folder: Path | None = None):
        """(context, pooled) or None; with a folder, a hit held only in memory is written there too."""
        key = self.key(encoder_id, caption)
        entry = self.memory.get(key)
        if entry is None and folder is not None:
            entry = self._read(folder / f"{key}.safetensors", encoder_id, caption)
            if entry is not None:
                self._keep(key, entry)
                self.saved.add(folder / f"{key}.safetensors")
        if entry is None:
            self.misses += 1
            return None
        self.memory.move_to_end(key)
        self.hits += 1
        if folder is not None:
            self._write(folder, key, encoder_id, caption, entry)
        return entry

    def put(self, encoder_id: str, caption: str, context: torch.Tensor, pooled: torch.Tensor | None,
            folder: Path | None = None) -> None:
        key = self.key(encoder_id, caption)
        entry = (context.detach().cpu(), None if pooled is None else pooled.detach().cpu())
        self._keep(key, entry)
        if folder is not None:
            self._write(folder, key, encoder_id, caption, entry)

    @staticmethod
    def _read(path: Path, encoder_id: str, caption: str):
        if not path.exists():
            return None
        try:
            tensors, metadata, _ = safetensors_io.read(path)
        except MoLEError:
            return None
        if "context" not in tensors or metadata.get("caption") != caption or \
                metadata.get("text_encoder") != encoder_id:
            return None
        return tensors["context"], tensors.get("pooled")

    def _write(self, folder: Path, key: str, encoder_id: str, caption: str, entry) -> None:
        path = folder / f"{key}.safetensors"
        if path in self.saved:
            return
        tensors = {"context": entry[0]} | ({} if entry[1] is None else {"pooled": entry[1]})
        safetensors_io.write(path, tensors, {"caption": caption, "text_encoder": encoder_id})
        self.saved.add(path)

    def _keep(self, key: str, entry: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        if key in self.memory:
            self.bytes -= sum(t.nbytes for t in self.memory.pop(key) if t is not None)
        self.memory[key] = entry
        self.bytes += sum(t.nbytes for t in entry if t is not None)
        while self.limit is not None and self.bytes > self.limit and len(self.memory) > 1:
            _, dropped = self.memory.popitem(last=False)
            self.bytes -= sum(t.nbytes for t in dropped if t is not None)


TEXT_CACHE = TextCache()


class Base:
    """A checkpoint as ComfyUI loads it: `patcher` (ModelPatcher), `unet` (its diffusion model), `clip`, `vae`."""

    def __init__(self, path: str | Path, clip_skip: int | None = None):
        import comfy.model_management
        import comfy.sd

        # ComfyUI runs text encoders in fp16, which is very slow on a CPU; training encodes many captions
        te_options = {"dtype": torch.float32} if comfy.model_management.cpu_mode() else {}
        try:
            self.patcher, self.clip, self.vae, _ = comfy.sd.load_checkpoint_guess_config(
                str(path), output_vae=True, output_clip=True, te_model_options=te_options)
        except (RuntimeError, ValueError, OSError) as e:
            raise MoLEError(f"{path}: ComfyUI could not load this checkpoint ({e})") from e
        if self.patcher is None or self.clip is None or self.vae is None:
            raise MoLEError(f"{path}: not a full SD checkpoint (needs UNet, text encoder and VAE)")
        self.path = Path(path)
        self.model = self.patcher.model
        self.unet = self.model.diffusion_model
        family = type(self.model.model_config).__name__
        if family not in FAMILIES:
            raise MoLEError(f"{path}: a {family} model; the trainer supports {', '.join(FAMILIES)}")
        self.family = FAMILIES[family]
        self.layout = UNetLayout.from_unet_config(self.model.model_config.unet_config, name=family)
        if clip_skip:
            self.clip.clip_layer(-clip_skip)
        self.unet.requires_grad_(False)
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.v_prediction = self.zsnr = False         # set by predict_v (--v_parameterization)
        self.fingerprint = fingerprint(self.unet)
        self.vae_id = self._vae_id()
        self.clip_skip = clip_skip
        self.text_folder: Path | None = None       # where TEXT_CACHE also keeps this base's encodings on disk
        self._text_encoder_id: str | None = None
        self._text_encoder_trains = False      # set for good by make_text_encoder_trainable
        self._compiled = None                  # the UNet through torch.compile (compile_unet), used by predict

    def _vae_id(self) -> str:
        digest = hashlib.sha256()
        for name, p in sorted(self.vae.first_stage_model.state_dict().items())[:8]:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def latent_channels(self) -> int:
        return self.model.latent_format.latent_channels

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    # -- inputs ----------------------------------------------------------------------------------------------
    @property
    def text_encoder(self) -> torch.nn.Module:
        """ComfyUI's text encoder module (SD1.5: CLIP-L; SDXL: CLIP-L and CLIP-G), the one the checkpoint saves."""
        return self.clip.cond_stage_model

    def encode_text(self, captions: list[str], size: tuple[int, int], grad: bool = False) -> Conditioning:
        """Text tokens per caption, cut at 75 tokens (the first CLIP chunk), clip skip applied; with `grad`, in
        the autograd graph (when the text encoder trains). A frozen text encoder's outputs come from TEXT_CACHE
        when it holds them (and go there when not), in memory and, when `text_folder` is set, on disk."""
        contexts, pooled = [], []
        cached = not grad and not self._text_encoder_trains
        with torch.set_grad_enabled(grad):
            for caption in captions:
                hit = TEXT_CACHE.get(self.text_encoder_id, caption, self.text_folder) if cached else None
                if hit is None:
                    hit = self.encode_caption(caption)
                    if cached:
                        TEXT_CACHE.put(self.text_encoder_id, caption, *hit, folder=self.text_folder)
                contexts.append(hit[0])
                pooled.append(hit[1])
        context = torch.cat(contexts).to(self.device)
        y = None
        if self.family == "SDXL":
            width, height = size
            y = self.model.encode_adm(pooled_output=torch.cat(pooled), width=width, height=height, crop_w=0,
                                      crop_h=0, target_width=width, target_height=height).to(self.device)
        return Conditioning(context, y)

    def encode_caption(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context (1, 77, D), pooled (1, P) or None) of one caption, never cached."""
        tokens = self.clip.tokenize(caption)
        tokens = {k: v[:1] for k, v in tokens.items()}          # 75 tokens + start/end: one chunk
        return self.clip.encode_from_tokens(tokens, return_pooled=True)

    @property
    def text_encoder_id(self) -> str:
        """Hash of the text encoder's weights (taken once: a text encoder that trains is never cached) and the
        clip skip: the same in a stage-1 file whose text encoder did not train as in its base, so later stages
        and evaluations reuse the base's encodings."""
        if self._text_encoder_id is None:
            digest = hashlib.sha256(f"{self.family}|clip_skip={self.clip_skip}".encode())
            for name, p in sorted(self.text_encoder.state_dict().items()):
                if name in UNUSED_TEXT_TENSORS or name.endswith("logit_scale"):
                    continue                  # never read for the encodings, and left uninitialised by ComfyUI
                digest.update(name.encode())
                digest.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            self._text_encoder_id = digest.hexdigest()[:16]
        return self._text_encoder_id

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> latents (B, 4, H/8, W/8) in the model's latent scale."""
        return self.model.process_latent_in(self.vae.encode(pixels)).to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.model.process_latent_out(latents))

    # -- the model -------------------------------------------------------------------------------------------
    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
        return abar.sqrt() * latents + (1 - abar).sqrt() * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet learns to predict: the noise, or with predict_v the velocity
        v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
        if not self.v_prediction:
            return noise
        abar = self.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
        return abar.sqrt() * noise - (1 - abar).sqrt() * latents

    @property
    def loaded_as_v(self) -> bool:
        """ComfyUI loaded this checkpoint as a v-prediction model (an SD2-v or a file marked `v_pred`)."""
        return getattr(self.model.model_type, "name", "") in ("V_PREDICTION", "V_PREDICTION_EDM")

    def predict_v(self, zsnr: bool = False) -> None:
        """Train (and sample while training) as a v-prediction model, with --zero_terminal_snr on the rescaled
        schedule; the sampler gets ComfyUI's own v-prediction sampling (what ModelSamplingDiscrete sets)."""
        import comfy.model_sampling

        class VSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
            pass

        self.v_prediction, self.zsnr = True, zsnr
        if zsnr:
            self.alphas_cumprod = zero_terminal_snr(self.alphas_cumprod)
        self.patcher.add_object_patch("model_sampling", VSampling(self.model.model_config, zsnr=zsnr))

    def checkpoint_activations(self, text_encoder: bool = False) -> int:
        """Gradient checkpointing: every ResBlock and transformer of the UNet (and every CLIP layer, with
        `text_encoder`) keeps only its inputs in the forward pass and recomputes the rest in the backward pass.
        Returns the number of checkpointed layers."""
        import comfy.clip_model

        u = self.unet
        layers = [layer for block in (*u.input_blocks, *([u.middle_block] if u.middle_block is not None else []),
                                      *u.output_blocks) for layer in block]
        if text_encoder:
            layers += [m for m in self.text_encoder.modules() if isinstance(m, comfy.clip_model.CLIPLayer)]
        for layer in layers:
            _checkpointed(layer)
        return len(layers)

    def make_text_encoder_trainable(self) -> torch.nn.Module:
        """The text encoder, with gradients on. ComfyUI's CLIP layers add their residuals into their input in
        place: right for inference, wrong for autograd (the LayerNorm before saved that input). Each layer's
        forward is replaced by the same two residual adds, out of place. Tensors the diffusion model never sees
        stay frozen: CLIP's logit scale and CLIP-L's text projection (no pooled output of CLIP-L is used; an SD1.5
        file does not even hold them, and ComfyUI leaves them unset and drops them on saving)."""
        import types

        import comfy.clip_model

        self._text_encoder_trains = True         # its outputs change from now on: TEXT_CACHE is not used
        for m in self.text_encoder.modules():
            if isinstance(m, comfy.clip_model.CLIPLayer):
                m.forward = types.MethodType(_clip_layer_forward, m)
        for name, p in self.text_encoder.named_parameters():
            p.requires_grad_(not (name.endswith("logit_scale") or name in UNUSED_TEXT_TENSORS))
        return self.text_encoder

    def compile_unet(self, backend: str = "inductor") -> None:
        """kohya's --torch_compile: `predict` calls the UNet through torch.compile with this dynamo backend; the
        module, its weights and its keys stay as they are (what is saved, and ComfyUI's sampler for the samples
        while training, use it uncompiled). Forward hooks (the stage's MoLE) are traced into the compiled graph, so
        a MoLE layer's many small operations run as a few fused kernels."""
        self._compiled = torch.compile(self.unet, backend=backend)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's epsilon prediction (ComfyUI's UNetModel.forward, with any attached hooks)."""
        unet = self.unet if self._compiled is None else self._compiled
        return unet(x_t, timesteps=t.float(), context=cond.context, y=cond.y, transformer_options={})


def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward with out-of-place residual adds (trainable)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def _checkpointed(module: torch.nn.Module) -> None:
    """Route the module's forward through torch.utils.checkpoint (non-reentrant, so forward hooks such as the
    MoLE layers' run again in the recomputation). Option dicts are copied: ComfyUI's blocks write into theirs."""
    import torch.utils.checkpoint

    if getattr(module, "_mole_checkpointed", False):
        return
    forward = module.forward

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = run
    module._mole_checkpointed = True
