"""The run's logbook: a CSV row per optimizer step (step, loss, lr, seconds) and the loss-curve PNG drawn from it.

On resume, rows after the resumed step are dropped, so the file always describes one consistent run.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ...mole_ops.plots import line_plot, save_png


class Logbook:
    HEADER = ["step", "loss", "lr", "seconds"]

    def __init__(self, path: Path, keep_until: int = 0):
        self.path = path
        self._kept = [r for r in self.rows() if int(r[0]) <= keep_until] if keep_until else []
        self._file = None

    def __enter__(self) -> "Logbook":
        self._file = open(self.path, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(self.HEADER)
        self._writer.writerows(self._kept)
        return self

    def write(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self._writer.writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{seconds:.2f}"])
        self._file.flush()                  # a killed run keeps every finished step

    def __exit__(self, *exc) -> None:
        self._file.close()

    def rows(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return [r for r in csv.reader(f)][1:]

    def plot(self, path: Path, title: str) -> None:
        """Loss per step and its running mean over a twentieth of the run, log scale when all losses are > 0."""
        rows = self.rows()
        if not rows:
            return
        steps = [int(r[0]) for r in rows]
        losses = [float(r[1]) for r in rows]
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        image = line_plot({"loss": losses, f"mean of {k}": smooth}, steps, title=title, xlabel="step",
                          ylabel="loss", logy=min(losses) > 0)
        save_png(image, str(path))
