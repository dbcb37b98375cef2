"""Shrink shipped UI workflows (512 px, 50 steps) to test size, keeping their graphs as they are."""
from __future__ import annotations

import copy


def shrink_ui(workflow: dict, width: int, height: int, steps: int) -> dict:
    workflow = copy.deepcopy(workflow)
    for node in workflow["nodes"]:
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [width, height]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = steps   # seed, control after generate, steps, ...
    return workflow
