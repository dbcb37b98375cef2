"""MoLE's host-free core: the gated mixture of low-rank experts, its file formats and the gate trace.

Imports torch, safetensors, einops and numpy only; never `comfy` at import time.
"""
