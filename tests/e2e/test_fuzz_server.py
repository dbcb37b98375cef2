"""Bad node inputs a workflow JSON can carry, queued through the real server between good prompts: each bad one is
refused by ComfyUI's validation (HTTP 400 naming the input) or fails at node time with this pack's own error type;
every good one still renders; the server's memory stays flat. (A BOOLEAN is not fuzzed: ComfyUI's validation turns
any value into true or false before the node sees it, as for stock nodes.)"""
from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
import uuid

from test_first_minutes import graph

from comfyui_mole.trainer.harness.comfy_server import ServerError

OURS = ("FormatError", "MismatchError", "ConfigError", "MoLEError")
BAD_NUMBERS = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, -5.0, "abc", None, [1], {"x": 1}]
BAD_NAMES = ["", " ", "nope.safetensors", "../../etc/passwd", "test_face", "x" * 300, "bad_truncated.safetensors",
             "bad_pickle.safetensors", "bad_nan.safetensors", "bad_sdxl_expert.safetensors",
             "test_gates.safetensors", "test_pack.safetensors", 5, None]
BAD_ROLES = ["", " ", "a b", "face/hand", "x" * 100, "feet", 7, None]


def bad_prompt(rng: random.Random, checkpoint: str) -> tuple[dict, str]:
    """One graph with one to three bad inputs; (graph, what was made bad)."""
    g = graph(checkpoint, prefix="fuzz_bad")
    changes = []
    for _ in range(rng.randint(1, 3)):
        node, key, value = rng.choice([
            *[("12", k, rng.choice(BAD_NUMBERS)) for k in ("strength_1", "strength_2", "strength_3",
                                                         "start_percent", "end_percent")],
            ("12", "mode", rng.choice(["sideways", "", None, 3])),
            *[("10", k, rng.choice(BAD_NAMES)) for k in ("expert_1", "expert_2")],
            ("10", "expert_3", rng.choice([n for n in BAD_NAMES if n not in ("", None)])),   # empty: a free slot
            *[("10", k, rng.choice(BAD_ROLES)) for k in ("role_1", "role_2")],
            ("11", "gate_file", rng.choice(BAD_NAMES)),
            ("12", "experts", rng.choice([["99", 0], ["10", 5], "10", None])),
        ])
        g[node]["inputs"][key] = value
        changes.append(f"{node}.{key}={value!r:.40}")
    return g, ", ".join(changes)


def post(server, g: dict) -> tuple[int, dict]:
    body = json.dumps({"prompt": g, "client_id": uuid.uuid4().hex}).encode()     # NaN and Infinity as JS would
    req = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def rss_mb(server) -> float:
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def execution_error(status: dict) -> dict | None:
    for kind, data in status.get("messages") or []:
        if kind == "execution_error":
            return data
    return None


def test_200_bad_prompts_between_good_ones(server, detectable, capsys):
    rng = random.Random(20261204)
    good = graph(detectable.name, prefix="fuzz_good")
    server.run(good)                                          # warm: the checkpoint and experts loaded once
    before = rss_mb(server)
    outcomes = {"refused (400)": 0, "failed with our error": 0}
    problems = []
    for i in range(200):
        g, what = bad_prompt(rng, detectable.name)
        code, answer = post(server, g)
        if code == 400:
            assert answer.get("error", {}).get("message") and (answer.get("node_errors") or answer["error"].get(
                "details") is not None), (what, answer)
            outcomes["refused (400)"] += 1
        else:
            assert code == 200, (what, code, answer)
            prompt_id = answer["prompt_id"]
            try:
                server.wait(prompt_id, timeout=120)
            except ServerError:
                pass                                          # failed, as it should: its error type is read below
            else:
                problems.append((f"bad prompt #{i}", what, "ran as if it were good"))
                continue
            entry = server.get(f"/history/{prompt_id}")[prompt_id]
            error = execution_error(entry["status"]) or {}
            if str(error.get("exception_type", "")).endswith(OURS) and error.get("exception_message"):
                outcomes["failed with our error"] += 1
            else:
                problems.append((what, error.get("node_type"), error.get("exception_type"),
                                 str(error.get("exception_message"))[:200]))
        if i % 20 == 19:                                      # a good prompt still renders
            good["5"]["inputs"]["seed"] = i
            outputs = server.run(good, timeout=120)
            assert len(server.output_files(outputs)) == 1
    after = rss_mb(server)
    with capsys.disabled():
        print(f"\n200 bad prompts: {outcomes}; server RSS {before:.0f} MB before, {after:.0f} MB after")
    assert problems == [], "\n".join(map(str, problems))
    assert sum(outcomes.values()) == 200
    assert after - before < 150, (before, after)
