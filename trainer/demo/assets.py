"""The demo world's shipped model files (its VAE, base UNet and judge): one reader and one writer, so every one is
loaded with the same checks and errors and written the same way.

Each is a safetensors file trained once by its own command and shipped next to this module; its metadata holds
`mole.world_version`, the world version (world.VERSION) it was trained on. Reading checks that the file is there,
readable and of this world; what the tensors must be is each module's own check.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...mole_ops.errors import MoLEError


def read(path: Path, what: str, command: str, missing_hint: str = "") -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, str]]:
    """(tensors, metadata) of the shipped file `path` ("the world's VAE", ... as `what`; `command` trains it),
    or a MoLEError naming the file and the fix: missing, unreadable, or trained on another world version."""
    from safetensors import safe_open

    from . import world

    path = Path(path)
    if not path.is_file():
        raise MoLEError(f"{path}: {what} is missing; `python -m trainer {command}` trains it{missing_hint}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:      # safetensors raises its own error types for damaged files
        raise MoLEError(f"{path}: not a readable safetensors file ({e}); `python -m trainer {command}` writes a "
                        "new one") from e
    trained_on = metadata.get("mole.world_version")
    if trained_on != str(world.VERSION):
        raise MoLEError(f"{path}: trained on world version {trained_on}, the world is version {world.VERSION}; "
                        f"`python -m trainer {command}` trains a new one")
    return tensors, metadata


def write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """The tensors in fp16 as safetensors with `metadata` (temp file, then rename: never a half-written file)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, str(tmp),
              metadata=metadata)
    tmp.replace(path)
    return path


def add_training_arguments(parser, what: str, shipped: Path, steps: int) -> None:
    """The flags every world-model command shares: --output (default: the shipped file) and --steps (default: the
    shipped file's)."""
    parser.add_argument("--output", type=Path, default=shipped, help=f"where to write {what} (default: the "
                                                                      "shipped file)")
    parser.add_argument("--steps", type=int, default=steps, help=f"training steps (the shipped file: {steps})")
