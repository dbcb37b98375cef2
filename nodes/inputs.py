"""Checks of node inputs that ComfyUI's validation lets through. A workflow's JSON (or a script posting to /prompt)
can carry NaN for a FLOAT (every comparison with NaN is false, so min/max pass it), any JSON value for a BOOLEAN or
a COMBO of an optional input, and a plain value where a link was expected (the node then gets the value itself).
Each check names the input and what it expects, as this pack's own error."""
from __future__ import annotations

import math

from ..mole_ops.card import Recommended
from ..mole_ops.errors import MismatchError
from ..mole_ops.expert_file import ExpertFile
from ..mole_ops.gate_file import GateFile


def finite(**values) -> None:
    """Every number given is a finite int or float."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MismatchError(f"input {name} is {value!r}: give a finite number")


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise MismatchError(f"input {name} is {value!r}: give true or false")
    return value


def text(name: str, value) -> str:
    if not isinstance(value, str):
        raise MismatchError(f"input {name} is {value!r}: give a text")
    return value


def experts(value, name: str = "experts") -> tuple[ExpertFile, ...]:
    """The MOLE_EXPERTS of a Load MoLE Experts / Pack / Three-File Set node."""
    if not isinstance(value, (tuple, list)) or not value or not all(isinstance(e, ExpertFile) for e in value):
        raise MismatchError(f"input {name} is {value!r:.60}: connect it to the experts output of Load MoLE "
                            "Experts, Load MoLE Pack or Load MoLE Three-File Set")
    return tuple(value)


def recommended(value, name: str = "recommended") -> Recommended | None:
    if value is not None and not isinstance(value, Recommended):
        raise MismatchError(f"input {name} is {value!r:.60}: connect it to the recommended output of Load MoLE "
                            "Pack, or leave it unconnected")
    return value


def gates(value, name: str = "gates") -> GateFile | None:
    if value is not None and not isinstance(value, GateFile):
        raise MismatchError(f"input {name} is {value!r:.60}: connect it to the gates output of Load MoLE Gates, "
                            "Load MoLE Pack or Load MoLE Three-File Set, or leave it unconnected")
    return value


def choice(name: str, value, options) -> str:
    """An optional COMBO's value: one of its options (a workflow or script can send anything there)."""
    if not isinstance(value, str) or value not in options:
        raise MismatchError(f"input {name} is {value!r:.60}: choose one of {', '.join(map(str, options))}")
    return value
