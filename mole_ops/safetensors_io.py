"""Strict safetensors reading and atomic writing, shared by the format modules (expert, gate, pack files)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .errors import FormatError

PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _header_length(blob: bytes, path: Path) -> int:
    # a safetensors header of 640, 896, 1152 or 1408 bytes starts with a pickle's magic bytes (0x80 0x02..0x05),
    # so the pickle check comes only after the bytes fail to read as a safetensors header
    n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else -1
    if 0 <= n <= len(blob) - 8 and blob[8:9] == b"{":
        return n
    if blob[:4] in PICKLE_MAGIC[:1] or blob[:2] in PICKLE_MAGIC[1:]:
        raise FormatError(f"{path}: a pickle checkpoint (.ckpt/.pt) is refused, it can run code when loaded; "
                          "convert it to .safetensors")
    if len(blob) < 8:
        raise FormatError(f"{path}: {len(blob)} bytes is too short for a safetensors file")
    raise FormatError(f"{path}: not a safetensors file, or truncated (header says {n} bytes, "
                      f"file has {len(blob)}); re-download or re-export it")


def read(path: str | os.PathLike, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, metadata, sha256 of the tensor data) of a safetensors file, or FormatError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    blob = path.read_bytes()
    n = _header_length(blob, path)
    try:
        header = json.loads(blob[8:8 + n])
        tensors = load_bytes(blob)
    except Exception as e:  # safetensors raises its own error types for every malformed case
        raise FormatError(f"{path}: not a valid safetensors file, or truncated ({e}); re-download or re-export it") \
            from e
    metadata = header.get("__metadata__") or {}
    if check_finite:
        for key, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FormatError(f"{path}: tensor {key!r} holds NaN or infinite values; the file is damaged "
                                  "(or was saved from a diverged training run)")
    return tensors, metadata, hashlib.sha256(blob[8 + n:]).hexdigest()


def data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor-data section that `write` produces (kohya's sshs_model_hash)."""
    blob = save_bytes({k: v.contiguous() for k, v in tensors.items()})
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write via a temp file in the same folder and rename, so a crash never leaves half a file behind."""
    path = Path(path)
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise FormatError(f"{path}: safetensors metadata must be strings; not: {bad[:3]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def json_metadata(metadata: dict[str, str], key: str, where: str, kind: str, default=None):
    """A metadata value that holds JSON, parsed and checked against its one declared kind: "names" (a list of
    strings), "object" (a JSON object) or "object of objects". Missing: `default`. Anything else is a FormatError
    naming the file, the key, what was found and what was expected."""
    expected = {"names": "a JSON list of expert names (strings)", "object": "a JSON object",
                "object of objects": "a JSON object of JSON objects"}[kind]
    text = metadata.get(key)
    if text in (None, ""):
        return default
    try:
        value = json.loads(text)
    except ValueError:
        value = ...
    ok = {"names": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
          "object": lambda v: isinstance(v, dict),
          "object of objects": lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values())}[kind]
    if value is ... or not ok(value):
        raise FormatError(f"{where}: metadata {key} should be {expected}, found {text[:80]!r}")
    return value
