"""What a MoLE node shows the artist: its summary and every warning it logged, as UI data the pack's frontend
extension (web/mole.js) draws on the node itself and raises as a toast.

The warnings are caught from the "mole" logger while the node runs (in the executing thread only), so a warning
that reaches the server log always reaches the UI too; the log keeps full paths, the node shows file names.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator

LOGGER = "mole"
PREFIX = "MoLE: "
# an absolute path of a model file in a message (POSIX or Windows, spaces allowed in folder and file names, starting
# after a space, a bracket or a quote): shown by its file name on the node
_PATH = re.compile(r"""(?<![^\s('"])(?:[A-Za-z]:)?[\\/](?:[^\\/\n'"]*[\\/])*?"""
                   r"""([^\\/\n'"]+?\.(?:safetensors|ckpt|pt|pth|bin))(?!\w)""")


class _Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage().removeprefix(PREFIX))


@contextlib.contextmanager
def caught_warnings() -> Iterator[list[str]]:
    """The warnings of the "mole" logger raised by this thread inside the block (they are still logged)."""
    handler = _Catch()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def file_names(text: str) -> str:
    """`text` with absolute model-file paths cut to their file names."""
    return _PATH.sub(lambda m: m.group(1), text)


def node_ui(lines: list[str], warnings: list[str]) -> tuple[str, dict]:
    """The node's report as a STRING (full paths, for Preview Any and for copying) and as UI data: `text` (the
    same string), `mole_lines` and `mole_warnings` (file names only; web/mole.js draws them on the node)."""
    unique = list(dict.fromkeys(warnings))
    text = "\n".join(lines + [f"WARNING: {w}" for w in unique])
    return text, {"text": [text], "mole_lines": [file_names(line) for line in lines],
                  "mole_warnings": [file_names(w) for w in unique]}
