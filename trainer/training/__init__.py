"""Training: the three stages on ComfyUI's own model code, with kohya's inputs, flags and file formats.

config (flags, TOML, validation), data and buckets (kohya datasets), model (the base and the noise schedule),
stages (what each stage trains and writes: the one registry of stages), loop (the step and the run), state
(saved training states), logbook (CSV log and loss curve), evaluation (held-out denoising loss at fixed noise),
optim, dist (torchrun/DDP), samples (kohya prompt files), prepare (dataset preparation).
It imports neither the demo nor the harness, except `harness.host` to find ComfyUI.
"""
