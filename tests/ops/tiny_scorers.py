"""Random-weight scorers of the real architectures, small: open_clip's ViT-H-14 layout (HPS v2's model) at a
small width, saved the way the official HPS checkpoint is ({"state_dict": ...}, open_clip's keys)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# ViT-H-14's config schema (head_width, patch 14, 224 px, 77 tokens, the full BPE vocabulary), small widths.
TINY_H14 = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 16,
                                            "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def write_tiny_hps(folder: Path, seed: int = 0, name: str = "ViT-H-14-tiny") -> tuple[Path, Path]:
    """(config JSON for --hps_arch, checkpoint for --hps) of a random tiny HPS-layout model."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_H14))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    checkpoint = folder / f"hps_{name}_{seed}.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return config, checkpoint
