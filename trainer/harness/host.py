"""One place that makes a ComfyUI importable in this process, for the trainer, the demo and the tests.

ComfyUI is not an installable package: its folder goes on sys.path, and its command-line arguments must be
set before `comfy.model_management` is first imported (CPU-only torch asserts otherwise).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ...mole_ops.errors import MoLEError

REPO_ROOT = Path(__file__).resolve().parents[2]


class HostError(MoLEError):
    """ComfyUI cannot be found or was configured differently earlier in this process."""


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def comfyui_path() -> Path:
    """The ComfyUI folder: $COMFYUI_PATH; else the ComfyUI whose custom_nodes/ holds this repository; else the
    host that `scripts/host.sh` unpacks into .host/."""
    if os.environ.get("COMFYUI_PATH"):
        path = Path(os.environ["COMFYUI_PATH"]).resolve()
    elif REPO_ROOT.parent.name == "custom_nodes" and _is_comfyui(REPO_ROOT.parents[1]):
        path = REPO_ROOT.parents[1]
    else:
        path = (REPO_ROOT / ".host" / "ComfyUI").resolve()
    if not _is_comfyui(path):
        raise HostError(f"no ComfyUI at {path}: run `make host` (or set COMFYUI_PATH to a ComfyUI folder)")
    return path


def use_comfy(cpu: bool | None = None) -> Path:
    """Put ComfyUI on sys.path and configure it for in-process use; returns its folder. Idempotent.

    cpu: force CPU (default: when torch sees no CUDA device). PyTorch attention is selected because it is
    ~1.6x faster on CPU than ComfyUI's default.
    """
    path = comfyui_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import torch
    import comfy.cli_args as cli_args

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if "comfy.model_management" in sys.modules:
        if bool(cli_args.args.cpu) != cpu:
            raise HostError(f"comfy.model_management was imported before use_comfy(cpu={cpu})")
        return path
    cli_args.args.cpu = cpu
    cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (initialises the device choice made above)

    return path
