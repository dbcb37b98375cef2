"""API-format graphs (what `POST /prompt` takes) built in code, for the demo and the tests."""
from __future__ import annotations


def txt2img(checkpoint: str, prompt: str, negative: str = "", seed: int = 0, steps: int = 4, cfg: float = 7.0,
            width: int = 64, height: int = 64, batch_size: int = 1, prefix: str = "mole") -> dict:
    """Load Checkpoint -> CLIP Text Encode x2 -> KSampler (euler) -> VAE Decode -> Save Image."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch_size}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
