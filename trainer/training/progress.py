"""Progress bars: tqdm on a terminal; in a log (CI, nohup, a file) one plain line every few seconds instead of a
carriage-return update per step, which would put a whole run on one line of many megabytes."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

EVERY = 5.0     # seconds between lines in a log


class _Lines:
    """The stream a LogLines bar writes through: tqdm's own carriage returns and line ends are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip("\r\n"):
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class LogLines(tqdm):
    """tqdm writing a plain line at most every `every` seconds, and the final state once."""

    def __init__(self, *args, every: float = EVERY, file=None, **kwargs):
        self._every, self._last_time, self._finished = every, float("-inf"), False
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 100)
        super().__init__(*args, file=_Lines(file or sys.stderr), **kwargs)

    def display(self, msg=None, pos=None):
        if msg == "":
            return True
        now = time.monotonic()
        done = self.disable or (self.total is not None and self.n >= self.total)
        if self._finished or (not done and now - self._last_time < self._every):
            return True
        self._last_time, self._finished = now, done
        self.fp.write((msg or self.__str__()).strip() + "\n")
        self.fp.flush()
        return True


def bar(*args, **kwargs) -> tqdm:
    """A progress bar with tqdm's arguments: tqdm itself on a terminal, LogLines elsewhere."""
    stream = kwargs.get("file") or sys.stderr
    return (tqdm if getattr(stream, "isatty", lambda: False)() else LogLines)(*args, **kwargs)
