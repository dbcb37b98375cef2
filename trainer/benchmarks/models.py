"""The models an evaluation compares, from a TOML file, and the ComfyUI graph that generates one image with each.

    reference = "SD1.5"                       # the model the others are compared with (default: the first)

    [[model]]
    name = "SD1.5"
    checkpoint = "/weights/v1-5-pruned-emaonly.safetensors"

    [[model]]
    name = "stage 1 + experts at 0.5"
    checkpoint = "/weights/mole_sd15_stage1.safetensors"
    experts = ["/weights/face.safetensors", "/weights/hand.safetensors"]   # roles: face, hand (or `roles = [...]`)
    mode = "none"                            # fixed scale: no gates
    strengths = [0.5, 0.5]

    [[model]]
    name = "MoLE local"
    checkpoint = "/weights/mole_sd15_stage1.safetensors"
    experts = ["/weights/face.safetensors", "/weights/hand.safetensors"]
    gates = "/weights/gates.safetensors"
    mode = "local"                           # local, global or both (the paper's MoLE)
    rank = "99% energy"                      # optional: the loaders' rank setting (experts reduced; default full)

    [[model]]
    name = "pack"
    checkpoint = "/weights/mole_sd15_stage1.safetensors"
    pack = "/weights/mole_pack.safetensors"

    [[model]]
    name = "MoLE-SDXL (authors)"
    checkpoint = "/weights/sd_xl_base_1.0.safetensors"
    set = ["/weights/lora_sdxl_face.safetensors", "/weights/lora_sdxl_hand.safetensors",
           "/weights/moe_sdxl.safetensors"]                # face LoRA, hand LoRA, gate file

Relative paths are relative to the TOML file. Every graph is the shipped txt2img workflow's (Load Checkpoint ->
the experts' loaders -> Apply MoLE -> KSampler -> VAE Decode) with its sampler settings unless the command line
overrides them, and without the gate views: what is scored is what artists run.
"""
from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...mole_ops.ops import MODES
from ...mole_ops.rank import NODE_OPTIONS
from ..harness.workflows import Graph, _apply, load_api
from ..training.config import ConfigError, read_text

KEYS = {"name", "checkpoint", "experts", "roles", "gates", "pack", "set", "mode", "strengths", "rank"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    checkpoint: Path
    experts: tuple[Path, ...] = ()
    roles: tuple[str, ...] = ()
    gates: Path | None = None
    pack: Path | None = None
    set: tuple[Path, ...] = ()
    mode: str = "both"
    strengths: tuple[float, ...] = ()
    rank: str = "full"                     # the loaders' rank setting (mole_ops/rank.py NODE_OPTIONS)

    @property
    def slug(self) -> str:
        """A folder name for its images: the name's letters and digits, plus a short hash (names may collide)."""
        plain = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_")[:40] or "model"
        return f"{plain}-{hashlib.sha1(self.name.encode()).hexdigest()[:6]}"

    @property
    def files(self) -> list[Path]:
        return [self.checkpoint, *self.experts, *([self.gates] if self.gates else []),
                *([self.pack] if self.pack else []), *self.set]

    def describe(self) -> dict:
        """What defines its images (with the files' sizes and times, so a changed file is noticed on resume)."""
        doc = {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
               for k, v in asdict(self).items()}
        doc["file_stats"] = {str(p): [p.stat().st_size, int(p.stat().st_mtime)] for p in self.files}
        return doc


@dataclass
class ModelList:
    models: list[ModelSpec]
    reference: str
    source: Path
    by_name: dict[str, ModelSpec] = field(init=False)

    def __post_init__(self):
        self.by_name = {m.name: m for m in self.models}


def _paths(source: Path, where: str, value, key: str) -> tuple[Path, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{source}: {where}: {key} must be a file path or a list of them, got {value!r}")
    paths = tuple((source.parent / v).expanduser() if not Path(v).expanduser().is_absolute()
                  else Path(v).expanduser() for v in values)
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"{source}: {where}: {key} {p} does not exist")
    return paths


def _spec(source: Path, i: int, entry: dict) -> ModelSpec:
    where = f"model {i + 1} ({entry.get('name', 'no name')!r})"
    if not isinstance(entry.get("name"), str) or not entry["name"].strip():
        raise ConfigError(f"{source}: model {i + 1}: every [[model]] needs a name")
    unknown = set(entry) - KEYS
    if unknown:
        raise ConfigError(f"{source}: {where}: unknown keys {sorted(unknown)} (known: {sorted(KEYS)})")
    if "checkpoint" not in entry:
        raise ConfigError(f"{source}: {where}: needs a checkpoint")
    sources = [k for k in ("experts", "pack", "set") if k in entry]
    if len(sources) > 1:
        raise ConfigError(f"{source}: {where}: give one of experts, pack or set, not {sources}")
    spec = {"name": entry["name"].strip(), "checkpoint": _paths(source, where, entry["checkpoint"], "checkpoint")[0]}
    if "experts" in entry:
        spec["experts"] = _paths(source, where, entry["experts"], "experts")
        roles = entry.get("roles", ["face", "hand", "expert3"][:len(spec["experts"])])
        if len(spec["experts"]) > 3 or len(roles) != len(spec["experts"]) or len(set(roles)) != len(roles):
            raise ConfigError(f"{source}: {where}: 1 to 3 experts with as many distinct roles, got "
                              f"{len(spec['experts'])} experts and roles {roles}")
        spec["roles"] = tuple(roles)
        if "gates" in entry:
            spec["gates"] = _paths(source, where, entry["gates"], "gates")[0]
    elif "gates" in entry:
        raise ConfigError(f"{source}: {where}: gates need their experts (experts = [...])")
    if "pack" in entry:
        spec["pack"] = _paths(source, where, entry["pack"], "pack")[0]
    if "set" in entry:
        spec["set"] = _paths(source, where, entry["set"], "set")
        if len(spec["set"]) != 3:
            raise ConfigError(f"{source}: {where}: set is [face LoRA, hand LoRA, gate file], got {len(spec['set'])}")
    has_gates = "gates" in spec or "pack" in spec or "set" in spec
    mode = entry.get("mode", "both" if has_gates else "none")
    if mode not in MODES:
        raise ConfigError(f"{source}: {where}: mode must be one of {list(MODES)}, got {mode!r}")
    if not sources and "mode" in entry:
        raise ConfigError(f"{source}: {where}: mode without experts (a checkpoint alone has no mode)")
    if sources and mode != "none" and not has_gates:
        raise ConfigError(f"{source}: {where}: mode {mode!r} needs gates; use mode = \"none\" for fixed scale")
    spec["mode"] = mode if sources else "none"
    strengths = entry.get("strengths", [])
    if not sources and strengths:
        raise ConfigError(f"{source}: {where}: strengths without experts")
    if not isinstance(strengths, list) or len(strengths) > 3 or \
            not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in strengths):
        raise ConfigError(f"{source}: {where}: strengths must be a list of up to 3 numbers, got {strengths!r}")
    spec["strengths"] = tuple(float(s) for s in strengths)
    rank = entry.get("rank", "full")
    if rank not in NODE_OPTIONS:
        raise ConfigError(f"{source}: {where}: rank must be one of {list(NODE_OPTIONS)} (the loaders' setting), "
                          f"got {rank!r}")
    if rank != "full" and not sources:
        raise ConfigError(f"{source}: {where}: rank without experts (it reduces the experts)")
    spec["rank"] = rank
    return ModelSpec(**spec)


def load(path: Path) -> ModelList:
    """Read and check a models TOML file; every error names the file, the model and the key."""
    path = Path(path)
    try:
        doc = tomllib.loads(read_text(path, "--models"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--models {path}: not valid TOML: {e}") from e
    entries = doc.get("model")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: no [[model]] tables (see `python -m trainer evaluate --help`)")
    unknown = set(doc) - {"model", "reference"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)} (known: model, reference)")
    models = [_spec(path, i, e) for i, e in enumerate(entries)]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: model names must differ: {names}")
    reference = doc.get("reference", names[0])
    if reference not in names:
        raise ConfigError(f"{path}: reference {reference!r} is not a model name ({names})")
    return ModelList(models, reference, path)


# -- the graph ------------------------------------------------------------------------------------------------------
def shipped_sampler() -> dict:
    """The KSampler settings of the shipped SD1.5 txt2img workflow (steps, cfg, sampler, scheduler)."""
    api = load_api("mole_sd15_txt2img")
    node = next(n for n in api.values() if n["class_type"] == "KSampler")
    return {k: node["inputs"][k] for k in ("steps", "cfg", "sampler_name", "scheduler")}


def server_names(models: list[ModelSpec]) -> dict[Path, tuple[str, str]]:
    """Each file's (models/ folder, name) inside the evaluation's ComfyUI; names stay the files' own unless two
    different files share one."""
    names: dict[Path, tuple[str, str]] = {}
    taken: dict[tuple[str, str], Path] = {}
    for m in models:
        for p in m.files:
            folder = "checkpoints" if p == m.checkpoint else "mole"
            key = p.resolve()
            if key in names:
                continue
            name = p.name
            if (folder, name) in taken:
                name = f"{p.stem}-{hashlib.sha1(str(key).encode()).hexdigest()[:6]}{p.suffix}"
            taken[(folder, name)] = key
            names[key] = (folder, name)
    return names


def graph(m: ModelSpec, names: dict[Path, tuple[str, str]], prompt: str, negative: str, seed: int,
          width: int, height: int, sampler: dict, prefix: str) -> dict:
    """One image of one model: the shipped txt2img graph with this model's loaders."""
    g = Graph()
    name = lambda p: names[p.resolve()][1]  # noqa: E731
    ckpt = g.add("CheckpointLoaderSimple", "Load stage-1 checkpoint", ckpt_name=name(m.checkpoint))
    pos = g.add("CLIPTextEncode", "Prompt", text=prompt, clip=[ckpt, 1])
    neg = g.add("CLIPTextEncode", "Negative prompt", text=negative, clip=[ckpt, 1])
    latent = g.add("EmptyLatentImage", width=width, height=height, batch_size=1)
    model = [ckpt, 0]
    experts = gates = None
    if m.experts:
        slots = {}
        for i in range(3):
            slots[f"expert_{i + 1}"] = name(m.experts[i]) if i < len(m.experts) else "(none)"
            slots[f"role_{i + 1}"] = m.roles[i] if i < len(m.roles) else ""
        experts = g.add("MoLE_LoadExperts", **slots, rank=m.rank)
        if m.gates:
            gates = g.add("MoLE_LoadGates", experts=[experts, 0], gate_file=name(m.gates))
    elif m.pack:
        experts = gates = g.add("MoLE_LoadPack", pack=name(m.pack), rank=m.rank)
    elif m.set:
        experts = gates = g.add("MoLE_LoadSet", expert_1=name(m.set[0]), role_1="face", expert_2=name(m.set[1]),
                                role_2="hand", gate_file=name(m.set[2]), rank=m.rank)
    if experts is not None:
        strengths = list(m.strengths) + [1.0] * (3 - len(m.strengths))
        gate_input = [gates, 1] if m.pack or m.set else [gates, 0] if gates else None
        apply_id = _apply(g, model, [experts, 0], gate_input, m.mode, strengths[0], strengths[1])
        g.nodes[apply_id]["inputs"]["strength_3"] = strengths[2]
        if gate_input is None:
            del g.nodes[apply_id]["inputs"]["gates"]
        model = [apply_id, 0]
    sample = g.add("KSampler", "KSampler", model=model, positive=[pos, 0], negative=[neg, 0],
                   latent_image=[latent, 0], seed=seed, denoise=1.0, **sampler)
    decode = g.add("VAEDecode", samples=[sample, 0], vae=[ckpt, 2])
    g.add("SaveImage", "Save image", images=[decode, 0], filename_prefix=prefix)
    return g.api()


def fingerprint(m: ModelSpec, settings: dict) -> str:
    return json.dumps({"model": m.describe(), "settings": settings}, sort_keys=True)


__all__ = ["ModelSpec", "ModelList", "load", "graph", "server_names", "shipped_sampler", "fingerprint"]
