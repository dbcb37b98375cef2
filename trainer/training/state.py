"""Training states (`--save_state`, `--resume`): everything a bitwise resume needs, in `<name>-state/state.pt`.

A state holds the trainable tensors, the optimizer and schedule, the training generator and torch's RNG, where
the run is (step, epoch, the epoch's batch order and position), and the stage, seed and process count it was
written by. Writing never loses the previous state: the new file is written and fsynced first and then renamed
into place in one step (a new folder appears whole, an existing folder's file is replaced whole), so a run killed
at any moment leaves either the old state or the new one.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import ConfigError

log = logging.getLogger("mole.trainer")
STATE_FILE = "state.pt"


@dataclass
class Progress:
    """Where the run is: optimizer steps done, and the position in the current epoch's batch order."""

    step: int = 0
    epoch: int = 0
    order: list = field(default_factory=list)
    position: int = 0


def save(folder: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler, generator: torch.Generator,
         progress: Progress, stage: str, seed: int, processes: int) -> None:
    state = {"trainable": {k: v.detach().clone() for k, v in trainable.items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
             "progress": asdict(progress), "stage": stage, "seed": seed, "processes": processes}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)            # left behind by a run killed while saving
    tmp.mkdir(parents=True)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if folder.exists():
        os.replace(tmp / STATE_FILE, folder / STATE_FILE)
        _fsync_folder(folder)
        tmp.rmdir()
    else:
        os.replace(tmp, folder)
        _fsync_folder(folder.parent)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(folder: Path, stage: str, processes: int) -> dict:
    """The state in `folder`, checked against the run that resumes it."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise ConfigError(f"--resume {folder}: no {STATE_FILE} (write states with --save_state)")
    state = torch.load(path, weights_only=True)
    if state["stage"] != stage:
        raise ConfigError(f"--resume {folder}: a train-{state['stage']} state, this is train-{stage}")
    if state.get("processes", 1) != processes:
        log.warning("--resume %s: saved by %d process(es), resumed by %d: the data order continues, but the "
                    "batches are split differently", folder, state.get("processes", 1), processes)
    return state


def restore(state: dict, folder: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler,
            generator: torch.Generator) -> Progress:
    """Put a loaded state back into the run's tensors, optimizer, schedule and generators; returns its progress."""
    if set(trainable) != set(state["trainable"]):
        raise ConfigError(f"--resume {folder}: its trainable tensors do not match this run's")
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(state["trainable"][k])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(**state["progress"])
