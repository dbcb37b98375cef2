# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the suite); `make serve` opens the
# demo in ComfyUI's UI.
# Both build the host when it is missing (scripts/host.sh; a second run only checks and takes seconds).
# COMFYUI_PATH=/path/to/ComfyUI and VENV=/path/to/venv point everything at an existing installation.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export VENV

.PHONY: host demo serve test test-all fuzz bench imagereward-env detector-env

host:
	@bash scripts/host.sh >/dev/null

demo: host
	$(PY) -m trainer demo

# ComfyUI's UI on the demo's files (runs the demo first if they are missing); PORT=8188 by default
serve: host
	$(PY) -m trainer serve --port $(or $(PORT),8188)

# ImageReward's own environment for `python -m trainer evaluate --imagereward ...` (.venv-imagereward)
imagereward-env: host
	bash scripts/imagereward-env.sh

# The face, hand and person detector's own environment for `python -m trainer prepare --detect ...` (.venv-detector)
detector-env: host
	bash scripts/detector-env.sh

test: host
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-all: host
	$(VENV)/bin/pytest -q --runslow $(PYTEST_ARGS)

# Every input the pack reads, fuzzed (tests/ops/fuzzing.py): FUZZ cases per file format (10,000 by default) and a
# tenth of that per text format, with a table per input kind (`make test` runs a CI-sized budget of the same)
fuzz: host
	$(VENV)/bin/pytest -q -s tests/ops/test_fuzz.py --fuzz $(or $(FUZZ),10000)

# Speed of the gated-expert op on the full-size SD1.5 UNet (prints a table; about 30 minutes on 2 cores), the same at
# the ranks the rank setting keeps (time, output error, stack memory per rule; about 10 minutes), MoLE's
# memory per Apply MoLE node and of a five-node ablation (about 2 minutes), then trainer throughput and peak memory
# on the detectable checkpoint (about 3 minutes: stage 3 with --torch_compile compiles first), stage 1 in 1 and 2
# processes (about 1 minute), then the cost of an EMoE score next to a 20-step generation (about 2 minutes). On a
# GPU machine: tests/gpu_check.py.
bench: host
	$(PY) tests/bench_mole_op.py
	$(PY) tests/bench_rank.py
	$(PY) tests/bench_memory.py
	$(PY) tests/bench_trainer.py
	$(PY) tests/bench_stage1.py
	$(PY) tests/bench_emoe.py
