"""Every input the pack reads, fuzzed with Hypothesis: the input kinds, their mutation strategies, and the contract.

The contract, per case: the loader returns, or raises the project's own error (MoLEError) whose message names the
file; no other exception escapes; it ends within TIME_BOUND seconds; the file it was given is unchanged.

Used twice: tests/ops/test_fuzz.py runs a CI-sized budget as property tests (`make test`), and with `--fuzz N`
(`make fuzz`) it runs N cases per file format and N/10 per text format and prints a table per input kind.
"""
from __future__ import annotations

import hashlib
import json
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import save as save_bytes
from mole_fakes import SD15_DIMS, fake_expert, fake_gates, layer_shapes

from comfyui_mole.mole_ops import expert_file, gate_file, pack_file
from comfyui_mole.mole_ops.errors import MoLEError
from comfyui_mole.mole_ops.layout import SD15

TIME_BOUND = 10.0            # seconds a single load may take before it counts as a hang
OUTCOMES = ("clear error", "loaded", "unclear error", "other exception", "hang", "file changed")


class Hang(Exception):
    pass


@dataclass(frozen=True)
class Kind:
    """One input kind: what a case is made of (bytes), where it is written (its file name) and what reads it."""

    name: str
    binary: bool                       # a file format (10x the cases of a text format in `make fuzz`)
    filename: str
    cases: st.SearchStrategy           # -> bytes
    load: Callable[[Path], object]


def outcome(kind: Kind, data: bytes, folder: Path) -> tuple[str, str]:
    """(one of OUTCOMES, detail) of loading `data` as `kind`."""
    path = folder / kind.filename
    path.write_bytes(data)
    before = hashlib.sha256(data).hexdigest()

    def alarm(signum, frame):
        raise Hang(f"no answer within {TIME_BOUND} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_BOUND)
    start = time.monotonic()
    try:
        kind.load(path)
        result = ("loaded", "")
    except Hang as e:
        result = ("hang", str(e))
    except MoLEError as e:
        result = ("clear error", "") if path.name in str(e) else ("unclear error", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001  (what the contract forbids, reported)
        result = ("other exception", f"{type(e).__name__}: {e}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if result[0] == "loaded" and time.monotonic() - start > TIME_BOUND:
        result = ("hang", f"took {time.monotonic() - start:.1f} s")
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() != before:
        result = ("file changed", f"{path} differs after the load")
    return result


# -- safetensors files: a valid file, then up to three mutations -------------------------------------------------
JUNK_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() |
                         st.text(max_size=20), lambda inner: st.lists(inner, max_size=4) |
                         st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X", ""])


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header_text: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + data


@st.composite
def _mutation(draw, blob: bytes) -> bytes:
    header, data = _split(blob)
    names = sorted(k for k in header if k != "__metadata__")
    what = draw(st.sampled_from(["truncate", "flip header byte", "flip byte", "header length", "dtype", "shape",
                                 "offsets", "drop key", "duplicate key", "metadata value", "drop metadata",
                                 "nan weights", "rename key", "junk tail"]))
    if what == "truncate":
        return blob[:draw(st.integers(0, max(0, len(blob) - 1)))]
    if what in ("flip header byte", "flip byte"):
        end = min(len(blob), 8 + len(json.dumps(header)) + 8) if what == "flip header byte" else len(blob)
        at = draw(st.integers(0, max(0, end - 1)))
        return blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1:]
    if what == "header length":
        n = draw(st.sampled_from([0, 1, 2 ** 32, 2 ** 62, 2 ** 64 - 1, len(blob), len(blob) - 9]))
        return struct.pack("<Q", n % 2 ** 64) + blob[8:]
    if what == "junk tail":
        return blob + draw(st.binary(min_size=1, max_size=64))
    if what == "nan weights":
        at = draw(st.integers(0, max(0, len(data) // 4 - 1))) * 4
        return _join(json.dumps(header).encode(), data[:at] + struct.pack("<f", float("nan")) + data[at + 4:])
    meta = dict(header.get("__metadata__", {}))
    if what in ("metadata value", "drop metadata"):
        if not meta:
            return blob
        key = draw(st.sampled_from(sorted(meta)))
        if what == "drop metadata":
            meta.pop(key)
        else:
            value = draw(JUNK_JSON)
            meta[key] = json.dumps(value) if draw(st.booleans()) else value      # JSON text, or not even a string
        header["__metadata__"] = meta
        return _join(json.dumps(header).encode(), data)
    if not names:
        return blob
    key = draw(st.sampled_from(names))
    if what == "dtype":
        header[key] = {**header[key], "dtype": draw(DTYPES)}
    elif what == "shape":
        header[key] = {**header[key], "shape": draw(st.lists(st.integers(-2, 2 ** 40), max_size=4) | JUNK_JSON)}
    elif what == "offsets":
        header[key] = {**header[key], "data_offsets": draw(st.lists(st.integers(-1, 2 ** 63), min_size=0,
                                                                     max_size=3) | JUNK_JSON)}
    elif what == "drop key":
        header.pop(key)
    elif what == "rename key":
        header[draw(st.text(max_size=40))] = header.pop(key)
    elif what == "duplicate key":
        text = json.dumps(header)
        entry = f'"{key}": {json.dumps(header[key])}'
        return _join(text.replace(entry, entry + ", " + entry, 1).encode(), data)
    return _join(json.dumps(header).encode(), data)


def _mutants(valid: bytes) -> st.SearchStrategy:
    @st.composite
    def build(draw):
        blob = valid
        for _ in range(draw(st.integers(1, 3))):
            if len(blob) < 8:
                break
            try:
                blob = draw(_mutation(blob))
            except (ValueError, UnicodeDecodeError, struct.error):
                # an earlier mutation broke the header: later ones flip and cut raw bytes
                at = draw(st.integers(0, max(0, len(blob) - 1)))
                blob = blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1:]
        return blob
    return build()


def _valid_files(folder: Path) -> dict[str, bytes]:
    """Small valid expert, gate and pack files of the SD1.5 layout (a few layers: fast to read)."""
    shapes = dict(list(layer_shapes(SD15, **SD15_DIMS).items())[:3])
    experts = [fake_expert(role, shapes, rank=2, seed=i) for i, role in enumerate(("face", "hand"))]
    gates = fake_gates(experts)
    paths = {"expert": folder / "valid_expert.safetensors", "gates": folder / "valid_gates.safetensors",
             "pack": folder / "valid_pack.safetensors"}
    expert_file.save(paths["expert"], experts[0])
    gate_file.save(paths["gates"], gates)
    pack_file.save(paths["pack"], experts, gates)
    out = {name: path.read_bytes() for name, path in paths.items()}
    # the authors' three-file set: diffusers-named LoRAs with only kohya's metadata, a gate file with none
    authors = fake_expert("face", shapes, rank=2, alpha=64.0, naming="diffusers", layout=SD15)
    out["authors expert"] = save_bytes({k: v.contiguous() for k, v in authors.tensors().items()},
                                       {"ss_network_dim": "2", "ss_network_alpha": "64.0"})
    out["authors gates"] = save_bytes({k: v.contiguous() for k, v in gates.tensors().items()})
    return out


# -- text formats ---------------------------------------------------------------------------------------------------
def _text_mutants(valid: str, junk_lines: st.SearchStrategy) -> st.SearchStrategy:
    """A valid text with lines dropped, duplicated, replaced or cut, or junk lines put in."""
    @st.composite
    def build(draw):
        lines = valid.splitlines()
        for _ in range(draw(st.integers(1, 3))):
            what = draw(st.sampled_from(["drop", "duplicate", "replace", "insert", "cut", "bytes"]))
            at = draw(st.integers(0, max(0, len(lines) - 1)))
            if what == "drop" and lines:
                lines.pop(at)
            elif what == "duplicate" and lines:
                lines.insert(at, lines[at])
            elif what == "replace" and lines:
                lines[at] = draw(junk_lines)
            elif what == "insert":
                lines.insert(at, draw(junk_lines))
            elif what == "cut" and lines:
                lines[at] = lines[at][:draw(st.integers(0, len(lines[at])))]
        text = "\n".join(lines).encode("utf-8", "surrogatepass") if lines else b""
        if draw(st.integers(0, 9)) == 0:                     # now and then, invalid UTF-8 or NUL bytes
            text += draw(st.sampled_from([b"\xff\xfe", b"\x00", b"\xc3"]))
        return text
    return build()


def _toml_value() -> st.SearchStrategy:
    return st.sampled_from(['""', "0", "-1", "1e309", "nan", "inf", "true", '"x"', "[]", "[1, 2]", "{}",
                            '"/no/such/folder"', '"../../etc"', "99999999999999999999", '"\\u0000"'])


def _toml_lines(keys: list[str]) -> st.SearchStrategy:
    return st.one_of(st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(keys + ["unknown_key", "x.y"]),
                               _toml_value()),
                     st.sampled_from(["[[datasets]]", "[[datasets.subsets]]", "[general]", "[[model]]", "[", "=",
                                      '"unterminated', "a = 1\na = 2"]),
                     st.text(max_size=30))


def text_kinds(folder: Path) -> list[Kind]:
    from comfyui_mole.trainer.benchmarks import models as model_list
    from comfyui_mole.trainer.benchmarks.evaluate import read_prompts
    from comfyui_mole.trainer.training.config import TrainConfig, read_text
    from comfyui_mole.trainer.training.data import load_dataset_toml, read_metadata

    images = folder / "images"
    images.mkdir(exist_ok=True)
    checkpoint = folder / "valid_expert.safetensors"
    dataset = (f'[general]\nresolution = 64\ncaption_extension = ".txt"\n\n[[datasets]]\nbatch_size = 1\n\n'
               f'[[datasets.subsets]]\nimage_dir = "{images}"\nnum_repeats = 2\n')
    models = (f'reference = "base"\n\n[[model]]\nname = "base"\ncheckpoint = "{checkpoint}"\n\n[[model]]\n'
              f'name = "mole"\ncheckpoint = "{checkpoint}"\nexperts = ["{checkpoint}", "{checkpoint}"]\n'
              f'mode = "both"\ngates = "{checkpoint}"\n')
    prompts = 'repeat,prompt_id,seed,prompt\n0,0,11,"a person waving"\n0,1,12,"a hand, raised"\n1,0,21,"x"\n'
    metadata = json.dumps({"img1": {"caption": "a person"}, "img2": {"tags": "hand"}}, indent=0)
    config = TrainConfig(stage="finetune", pretrained_model_name_or_path=str(checkpoint), output_dir=str(folder))
    return [
        Kind("kohya dataset TOML", False, "dataset.toml",
             _text_mutants(dataset, _toml_lines(["resolution", "batch_size", "image_dir", "num_repeats",
                                                  "caption_extension", "keep_tokens", "caption_dropout_rate",
                                                  "flip_aug", "metadata_file"])),
             lambda p: load_dataset_toml(p, config)),
        Kind("evaluate models.toml", False, "models.toml",
             _text_mutants(models, _toml_lines(["reference", "name", "checkpoint", "experts", "mode", "gates",
                                                 "strengths"])),
             model_list.load),
        Kind("evaluate prompt file", False, "prompts.csv",
             _text_mutants(prompts, st.text(max_size=40) | st.sampled_from(['"', '""",', "prompt", ",,,"])),
             lambda p: read_prompts(p, None)),
        Kind("caption file", False, "picture.txt",
             _text_mutants("a smiling person raising the right hand\nblue background", st.text(max_size=40)),
             lambda p: read_text(p, "caption file")),
        Kind("fine-tune metadata JSON", False, "meta.json",
             _text_mutants(metadata, st.text(max_size=30) | st.sampled_from(["{", "}", "null", "[1]", '"x": 5,'])),
             read_metadata),
    ]


@st.composite
def _byte_mutants(draw, valid: bytes) -> bytes:
    """Truncated, bytes flipped (mostly in the first 256: headers and chunk lengths), or junk appended."""
    blob = valid
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["truncate", "flip head", "flip", "junk tail"]))
        if what == "truncate":
            blob = blob[:draw(st.integers(0, max(0, len(blob) - 1)))]
        elif what == "junk tail":
            blob += draw(st.binary(min_size=1, max_size=64))
        elif blob:
            end = min(len(blob), 256) if what == "flip head" else len(blob)
            at = draw(st.integers(0, end - 1))
            blob = blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1:]
    return blob


def _valid_png(mode: str) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (24, 20, len(mode)), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, format="PNG")
    return out.getvalue()


def file_kinds(folder: Path) -> list[Kind]:
    from comfyui_mole.trainer.training.data import load_image, load_mask

    valid = _valid_files(folder)
    return [
        Kind("training image", True, "image.png", _byte_mutants(_valid_png("RGB")),
             lambda p: load_image(p, (16, 16))),
        Kind("mask image (alpha)", True, "mask.png", _byte_mutants(_valid_png("RGBA")),
             lambda p: load_mask(p, True, (16, 16))),
        Kind("expert file", True, "expert.safetensors", _mutants(valid["expert"]),
             lambda p: expert_file.load(p, "face")),
        Kind("gate file", True, "gates.safetensors", _mutants(valid["gates"]), gate_file.load),
        Kind("authors' face LoRA", True, "lora_sdxl_face.safetensors", _mutants(valid["authors expert"]),
             lambda p: expert_file.load(p, "face")),
        Kind("authors' gate file", True, "moe_gates.safetensors", _mutants(valid["authors gates"]), gate_file.load),
        Kind("pack file", True, "pack.safetensors", _mutants(valid["pack"]), pack_file.load),
    ]


def all_kinds(folder: Path) -> list[Kind]:
    torch.manual_seed(0)
    return file_kinds(folder) + text_kinds(folder)
