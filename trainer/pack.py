"""`python -m trainer pack`: experts + gates (+ a card TOML and a preview picture) -> a shareable MoLE.

Writes, beside each other:
- `<name>.safetensors`: the pack (pack_file), its metadata carrying the card (mole_ops/card.py: Stability AI's
  model spec keys as kohya writes them, a thumbnail, the base model in words, the recommended settings);
- `<name>.md`: a model card in the front-matter form model hubs read (licence, base model, tags, pipeline), with
  the preview, the recommended settings, the files' sha256 and how to use it;
- `<name>.png`: the preview (when given);
- `<name>_workflow.json`: the pack's ComfyUI workflow (workflows/pack/, with this pack's file names and sampler
  settings): drag it onto the canvas.

`--preset authors-sdxl` fills the card of the authors' MoLE-SDXL release (their role names, DDIM 50 steps, CFG 7.5
as in their scripts) for their three files.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

from ..mole_ops import card as card_format
from ..mole_ops import expert_file, gate_file, pack_file
from ..mole_ops.errors import FormatError, MismatchError
from ..mole_ops.layout import detect_layout

log = logging.getLogger("mole.train")

PRESETS = {
    "authors-sdxl": card_format.Card(
        title="MoLE-SDXL (the authors' release)",
        description="The face and hand experts and the gates of MoLE (Zhu et al., 'MoLE: Enhancing Human-centric "
                    "Text-to-image Diffusion via Mixture of Low-rank Experts', NeurIPS 2024), as released by its "
                    "authors for SDXL.",
        author="Jie Zhu et al. (released at huggingface.co/jiezhueval/MoLE-SDXL)",
        base_model="SDXL 1.0 base (sd_xl_base_1.0.safetensors)", tags=["mole", "faces", "hands", "sdxl"],
        usage_hint="people: faces and hands; 1024 px",
        recommended=card_format.Recommended(mode="both", strengths={"face": 1.0, "hand": 1.0}, steps=50, cfg=7.5,
                                            sampler="ddim", scheduler="ddim_uniform")),
}
SIZES = {"SD1.5": 512, "SDXL": 1024}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts", nargs="+", required=True, metavar="ROLE=FILE",
                        help="the expert LoRAs, role=file (face=face.safetensors hand=hand.safetensors)")
    parser.add_argument("--gates", type=Path, required=True, help="the gate file trained with these experts")
    parser.add_argument("--output", type=Path, required=True, help="the pack to write (<name>.safetensors)")
    parser.add_argument("--card", type=Path, help="card TOML: title, description, author, license, base_model, "
                        "tags, usage_hint, and a [recommended] table (mode, strengths, start_percent, end_percent, "
                        "steps, cfg, sampler, scheduler)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a ready card (a --card file adds to it)")
    parser.add_argument("--preview", type=Path, help="a picture made with the pack: shown on the model card, and "
                        "scaled down into the pack as its thumbnail")
    parser.add_argument("--thumbnail", type=Path, help="a small picture (at most 512 px, 256 KiB) to embed as the "
                        "thumbnail instead of one made from --preview")
    parser.add_argument("--checkpoint_name", help="the checkpoint file name the card's workflow loads (default: "
                        "the one named in base_model, else mole_sd15_stage1.safetensors)")
    parser.add_argument("--prompt", default="", help="the workflow's prompt (default: the shipped workflows')")
    parser.set_defaults(run=run)


def experts_in_gate_order(items: list[str], gates: gate_file.GateFile) -> list[expert_file.ExpertFile]:
    """The experts named role=file, loaded and put in the gates' column order."""
    paths = {}
    for item in items:
        role, sep, path = item.partition("=")
        if not sep or not path:
            raise MismatchError(f"--experts {item!r}: give role=file, e.g. face=face.safetensors")
        paths[role] = Path(path)
    if sorted(paths) != sorted(gates.experts):
        raise MismatchError(f"--experts names {sorted(paths)}, but the gates in {gates.path} were trained for "
                            f"{list(gates.experts)}: give one file per role of the gates")
    return [expert_file.load(paths[role], role) for role in gates.experts]


def family_of(expert: expert_file.ExpertFile) -> str:
    """SD1.5 or SDXL: from kohya's ss_base_model_version, else from the layer names."""
    version = expert.metadata.get("ss_base_model_version", "")
    if version.startswith(("sd_v1", "sdxl")):
        return "SDXL" if version.startswith("sdxl") else "SD1.5"
    return detect_layout(expert.layers, f"expert {expert.name!r} ({expert.path})").name


def make_card(args: argparse.Namespace, experts) -> card_format.Card:
    card = copy.deepcopy(PRESETS[args.preset]) if args.preset else card_format.Card()
    if args.card:
        given = card_format.read_toml(args.card)
        text = {k: v for k, v in vars(given).items() if v not in ("", [], None)}
        card = replace(card, **text)
    if args.thumbnail:
        card.thumbnail = card_format.thumbnail(args.thumbnail)
    elif args.preview:
        card.thumbnail = card_format.thumbnail(args.preview, made_from_preview=True)
    if card.recommended is not None:
        unknown = sorted(set(card.recommended.strengths) - {e.name for e in experts})
        if unknown:
            raise FormatError(f"card: [recommended] strengths name {unknown}, which are not experts of this pack "
                              f"({[e.name for e in experts]})")
    if not card.title:
        card.title = args.output.stem
    return card


def workflow(card: card_format.Card, pack_name: str, checkpoint: str, family: str, prompt: str) -> dict:
    """The pack workflow (workflows/pack/) with this pack's files, size and recommended sampler settings."""
    from .harness.workflows import PACK

    ui = json.loads(PACK.ui_path.read_text())
    rec = card.recommended or card_format.Recommended()
    for node in ui["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "MoLE_LoadPack":
            values[0] = pack_name
        elif node["type"] == "CheckpointLoaderSimple":
            values[0] = checkpoint
        elif node["type"] == "KSampler":            # seed, control after generate, steps, cfg, sampler, scheduler
            values[2:6] = [rec.steps, rec.cfg, rec.sampler, rec.scheduler]
        elif node["type"] == "EmptyLatentImage":
            values[:2] = [SIZES[family], SIZES[family]]
        elif node["type"] == "CLIPTextEncode" and node.get("title") == "Prompt" and prompt:
            values[0] = prompt
        elif node["type"] == "MarkdownNote":
            values[0] = f"{card.title}\n\n{values[0]}"
    return ui


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(card: card_format.Card, pack: Path, experts, gates, preview: str | None, workflow_name: str,
               checkpoint: str) -> str:
    """The model card: YAML front matter (licence, base model, tags, pipeline) and a body a person reads."""
    def quoted(text: str) -> str:
        return json.dumps(text)            # a JSON string is a valid YAML scalar

    front = ["---", f"license: {quoted(card.license or 'other')}"]
    if card.base_model:
        front.append(f"base_model: {quoted(card.base_model)}")
    front += ["tags:"] + [f"- {quoted(t)}" for t in ["mole", "comfyui", "lora", *card.tags] if t] + \
             ["pipeline_tag: text-to-image", "library_name: comfyui", "---", ""]
    body = [f"# {card.title}", ""]
    if preview:
        body += [f"![{card.title}]({preview})", ""]
    if card.description:
        body += [card.description, ""]
    if card.author:
        body += [f"By {card.author}.", ""]
    body += ["## Use it in ComfyUI", "",
             f"1. Put `{pack.name}` in `ComfyUI/models/mole` and the checkpoint "
             f"(`{checkpoint}`{'; ' + card.base_model if card.base_model else ''}) in `ComfyUI/models/checkpoints`.",
             "2. Install ComfyUI-MoLE (ComfyUI Manager, or clone it into `ComfyUI/custom_nodes`).",
             f"3. Drag [`{workflow_name}`]({workflow_name}) onto the canvas: Load MoLE Pack shows this card and sends "
             "the recommended settings to Apply MoLE; the KSampler holds the recommended sampler settings.", ""]
    rec = card.recommended
    if rec is not None:
        body += ["## Recommended settings", "", "| setting | value |", "|---|---|", f"| gate mode | {rec.mode} |"]
        body += [f"| strength of {role} | {s:g} |" for role, s in rec.strengths.items()]
        body += [f"| acting from | {rec.start_percent:.0%} to {rec.end_percent:.0%} of the steps |",
                 f"| sampler | {rec.sampler}, {rec.scheduler}, {rec.steps} steps |", f"| CFG | {rec.cfg:g} |", ""]
    if card.usage_hint:
        body += [f"Usage: {card.usage_hint}", ""]
    body += ["## Files", "", "| file | sha256 |", "|---|---|", f"| `{pack.name}` | `{file_sha256(pack)}` |"]
    body += [f"| expert `{e.name}` inside (tensor data; rank {'/'.join(map(str, sorted(e.ranks)))}, alpha "
             f"{'/'.join(f'{a:g}' for a in sorted(e.alphas))}) | `{e.sha256}` |" for e in experts]
    body += ["", f"Gates: {gates.variant} variant, experts in the order {', '.join(gates.experts)}; a MoLE "
             "(Mixture of Low-rank Experts) pack for ComfyUI-MoLE. The experts inside are kohya LoRAs; "
             "`python -m trainer` of ComfyUI-MoLE made this pack.", ""]
    return "\n".join(front + body)


def run(args: argparse.Namespace) -> int:
    from ..mole_ops.atomic import write_text

    gates = gate_file.load(args.gates)
    experts = experts_in_gate_order(args.experts, gates)
    family = family_of(experts[0])
    card = make_card(args, experts)
    out = args.output.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    pack_file.save(out, experts, gates, card_format.to_metadata(card, family))
    experts, gates = pack_file.load(out)          # what a user loads: checked, and with the hashes as stored
    preview = None
    if args.preview:                     # the preview beside the card, as PNG (written to a temp file, renamed)
        from PIL import Image

        from ..mole_ops.atomic import replacing

        preview = f"{out.stem}.png"
        with Image.open(args.preview) as im, replacing(out.with_name(preview)) as tmp:
            im.convert("RGB").save(tmp, "PNG")
    named = card.base_model.split("(")[-1].strip(" )") if card.base_model else ""
    checkpoint = args.checkpoint_name or (named if named.endswith((".safetensors", ".ckpt")) else
                                          "mole_sd15_stage1.safetensors")
    flow_name = f"{out.stem}_workflow.json"
    write_text(out.with_name(flow_name),
               json.dumps(workflow(card, out.name, checkpoint, family, args.prompt), indent=1) + "\n")
    write_text(out.with_suffix(".md"), model_card(card, out, experts, gates, preview, flow_name, checkpoint))
    log.info("wrote %s (%s, experts %s), %s, %s%s", out, family, ", ".join(e.name for e in experts),
             out.with_suffix(".md").name, flow_name, f", {preview}" if preview else "")
    return 0
