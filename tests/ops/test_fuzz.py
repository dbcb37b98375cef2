"""Every input the pack reads, fuzzed (fuzzing.py): CI-sized here, `make fuzz` for the long run with its table."""
from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, seed, settings

from fuzzing import OUTCOMES, all_kinds, outcome

NAMES = ["training image", "mask image (alpha)", "expert file", "gate file", "authors' face LoRA",
         "authors' gate file", "pack file", "kohya dataset TOML", "evaluate models.toml", "evaluate prompt file",
         "caption file", "fine-tune metadata JSON"]
SEED = 20261204              # `make fuzz` reproduces its table with this seed
CI_CASES = {True: 60, False: 30}           # per file format, per text format
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.function_scoped_fixture]
TABLE: dict[str, collections.Counter] = {}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    found = {k.name: k for k in all_kinds(folder)}
    assert sorted(found) == sorted(NAMES)
    return folder, found


@pytest.mark.parametrize("name", NAMES)
def test_every_bad_input_gives_a_clear_error_naming_the_file(kinds, name, request):
    """No exception but MoLEError escapes a loader, each names the file, none hangs, the file is unchanged."""
    folder, found = kinds
    kind = found[name]
    budget = request.config.getoption("--fuzz")
    cases = (budget if kind.binary else max(1, budget // 10)) if budget else CI_CASES[kind.binary]
    counts = collections.Counter()
    examples: dict[str, str] = {}

    @seed(SEED)
    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=HEALTH, derandomize=False)
    @given(kind.cases)
    def case(data):
        result, detail = outcome(kind, data, folder)
        counts[result] += 1
        examples.setdefault(result, detail)
        if not budget:
            assert result in ("clear error", "loaded"), f"{name}: {result}: {detail}"

    case()
    TABLE[name] = counts
    if budget:
        print(f"\n{name}: " + ", ".join(f"{k} {counts[k]}" for k in OUTCOMES) + f" (seed {SEED})")
        for result in ("unclear error", "other exception", "hang", "file changed"):
            if result in examples:
                print(f"  first {result}: {examples[result][:300]}")
    assert sum(counts[k] for k in ("unclear error", "other exception", "hang", "file changed")) == 0, \
        (name, dict(counts), {k: v[:300] for k, v in examples.items()})
