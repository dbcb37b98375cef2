"""Offline pipelines of MoLE, one concern per package:

- `training/`: stages 1-3 (fine-tune, experts, gates) and dataset preparation;
- `demo/`: the whole pipeline in a synthetic world, with its evidence and report;
- `harness/`: ComfyUI lookup, a real server, tiny models and the shipped workflows (demo, tests, benchmarks);
- `benchmarks/`: the paper's prompt benchmarks on a user's own files;
- `audit.py`: the EMoE prompt audit.

Run as `python -m trainer <command>` from the repository root (or `mole-train` once pip-installed).
"""
