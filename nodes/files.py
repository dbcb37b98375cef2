"""Model folders of MoLE: `models/mole/` for expert, gate and pack files; expert files also from `models/loras`."""
from __future__ import annotations

import logging
import os

import folder_paths

from ..mole_ops.errors import FormatError

log = logging.getLogger("mole")
FOLDER = "mole"
NONE = "(none)"


def register_folder() -> None:
    """Make `models/mole` a ComfyUI model folder and create it, so that a new user sees where MoLE files go
    (idempotent; extra_model_paths.yaml may add more paths)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".safetensors"})
    try:
        os.makedirs(default, exist_ok=True)
    except OSError as e:        # a read-only models folder: the loaders still list models/loras
        log.warning("MoLE: could not create %s (%s)", default, e)


def mole_files() -> list[str]:
    return sorted(folder_paths.get_filename_list(FOLDER))


def expert_files() -> list[str]:
    """Files in models/mole, then LoRAs from models/loras that are not also in models/mole."""
    own = mole_files()
    return own + [f for f in sorted(folder_paths.get_filename_list("loras")) if f not in own]


def full_path(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise FormatError(f"file name {name!r}: pick a file in the loader (models/{FOLDER} or models/loras)")
    for folder in (FOLDER, "loras"):
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    raise FormatError(f"{name}: not found in models/{FOLDER} or models/loras")
