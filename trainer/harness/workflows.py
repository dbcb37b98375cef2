"""The shipped workflows: API-format graphs built here, and their UI-format twins made from the server's node
definitions (`/object_info`), so both files of a pair always describe the same graph. `Graph` is the one builder
of API-format graphs (what `POST /prompt` takes), also for the plain `txt2img` graph of the demo and the tests.

`python -m trainer workflows` starts a real ComfyUI, asks it for the node definitions and rewrites `workflows/`.
The tests check that the committed files equal what this module makes.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .host import REPO_ROOT

log = logging.getLogger("mole.workflows")
FOLDER = REPO_ROOT / "workflows"          # UI workflows: what ComfyUI serves as this pack's templates
API_FOLDER = FOLDER / "api"               # their API twins, one folder down: the template scanner does not list them
# the frontend labels a widget by its input name unless a pack's locales/<lang>/nodeDefs.json names it: the
# declared display names reach the canvas only through this file (ComfyUI serves every pack's locales/)
LOCALE = REPO_ROOT / "locales" / "en" / "nodeDefs.json"

# The file names the workflows expect (the demo writes its trained files under the SD1.5 names).
SD15 = {"checkpoint": "mole_sd15_stage1.safetensors", "face": "mole_sd15_face.safetensors",
        "hand": "mole_sd15_hand.safetensors", "gates": "mole_sd15_gates.safetensors"}
SDXL = {"checkpoint": "sd_xl_base_1.0.safetensors", "face": "mole_sdxl_face.safetensors",
        "hand": "mole_sdxl_hand.safetensors", "gates": "mole_sdxl_gates.safetensors"}
PROMPT = "a photo of a smiling woman waving her hand, close-up, natural light"
NEGATIVE = "blurry, deformed hands, extra fingers, bad anatomy"


@dataclass
class Graph:
    """An API-format graph under construction: node ids are given in order of addition."""

    nodes: dict[str, dict] = field(default_factory=dict)

    def add(self, class_type: str, title: str | None = None, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"inputs": inputs, "class_type": class_type,
                               "_meta": {"title": title or class_type}}
        return node_id

    def api(self) -> dict:
        return json.loads(json.dumps(self.nodes))


def _sampler(g: Graph, model, pos, neg, latent, title, steps, cfg, seed=42, sampler="ddim", scheduler="ddim_uniform"):
    return g.add("KSampler", title, model=model, positive=pos, negative=neg, latent_image=latent, seed=seed,
                 steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler, denoise=1.0)


def txt2img(checkpoint: str, prompt: str, negative: str = "", seed: int = 0, steps: int = 4, cfg: float = 7.0,
            width: int = 64, height: int = 64, batch_size: int = 1, prefix: str = "mole") -> dict:
    """A plain API graph without MoLE: Load Checkpoint (1) -> two CLIP Text Encodes (2, 3) -> Empty Latent (4) ->
    KSampler (5, euler) -> VAE Decode (6) -> Save Image (7); the tests extend it by node id."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=checkpoint)
    pos = g.add("CLIPTextEncode", text=prompt, clip=[ckpt, 1])
    neg = g.add("CLIPTextEncode", text=negative, clip=[ckpt, 1])
    latent = g.add("EmptyLatentImage", width=width, height=height, batch_size=batch_size)
    sample = _sampler(g, [ckpt, 0], [pos, 0], [neg, 0], [latent, 0], None, steps, cfg, seed, "euler", "normal")
    decode = g.add("VAEDecode", samples=[sample, 0], vae=[ckpt, 2])
    g.add("SaveImage", images=[decode, 0], filename_prefix=prefix)
    return g.api()


def _apply(g: Graph, model, experts, gates, mode="both", face=1.0, hand=1.0, record=False, title="Apply MoLE"):
    return g.add("MoLE_Apply", title, model=model, experts=experts, gates=gates, mode=mode, strength_1=face,
                 strength_2=hand, strength_3=1.0, start_percent=0.0, end_percent=1.0, record_trace=record)


def _base(g: Graph, files: dict, width: int, height: int):
    ckpt = g.add("CheckpointLoaderSimple", "Load stage-1 checkpoint", ckpt_name=files["checkpoint"])
    pos = g.add("CLIPTextEncode", "Prompt", text=PROMPT, clip=[ckpt, 1])
    neg = g.add("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=[ckpt, 1])
    latent = g.add("EmptyLatentImage", width=width, height=height, batch_size=1)
    return ckpt, pos, neg, latent


def _gate_views(g: Graph, apply_id: str, images: list, prefix: str) -> None:
    maps = g.add("MoLE_GateMaps", trace=[apply_id, 1], images=images, steps="auto", image_index=0, rows="cond")
    curves = g.add("MoLE_GateCurves", trace=[apply_id, 1], images=images, image_index=-1, rows="cond")
    g.add("SaveImage", "Save gate maps (steps x experts)", images=[maps, 0], filename_prefix=f"{prefix}_gate_grid")
    g.add("SaveImage", "Save gate overlay", images=[maps, 1], filename_prefix=f"{prefix}_gate_overlay")
    g.add("SaveImage", "Save gate curves", images=[curves, 0], filename_prefix=f"{prefix}_gate_curves")
    g.add("MoLE_SaveTrace", trace=[apply_id, 1], images=images, filename_prefix=f"{prefix}_trace")


def _load_experts(g: Graph) -> str:
    return g.add("MoLE_LoadExperts", expert_1=SD15["face"], role_1="face", expert_2=SD15["hand"], role_2="hand",
                 expert_3="(none)", role_3="")


def _sd15_experts(g: Graph) -> tuple[str, str]:
    experts = _load_experts(g)
    return experts, g.add("MoLE_LoadGates", experts=[experts, 0], gate_file=SD15["gates"])


def txt2img_sd15() -> Graph:
    """SD1.5 MoLE txt2img with gate maps, gate curves and the saved trace."""
    g = Graph()
    ckpt, pos, neg, latent = _base(g, SD15, 512, 512)
    experts, gates = _sd15_experts(g)
    apply_id = _apply(g, [ckpt, 0], [experts, 0], [gates, 0], record=True)
    sample = _sampler(g, [apply_id, 0], [pos, 0], [neg, 0], [latent, 0], "KSampler", 50, 7.5)
    decode = g.add("VAEDecode", samples=[sample, 0], vae=[ckpt, 2])
    g.add("SaveImage", "Save image", images=[decode, 0], filename_prefix="mole_sd15")
    _gate_views(g, apply_id, [decode, 0], "mole_sd15")
    return g


ABLATION = (("base", None), ("face only", ("both", 1.0, 0.0)), ("hand only", ("both", 0.0, 1.0)),
            ("local", ("local", 1.0, 1.0)), ("global", ("global", 1.0, 1.0)), ("both", ("both", 1.0, 1.0)))


def ablation_sd15() -> Graph:
    """The paper's ablation from one seed: base, face only, hand only, local only, global only, both."""
    g = Graph()
    ckpt, pos, neg, latent = _base(g, SD15, 512, 512)
    experts, gates = _sd15_experts(g)
    images = {}
    for i, (label, setting) in enumerate(ABLATION, start=1):
        model = [ckpt, 0]
        if setting is not None:
            mode, face, hand = setting
            model = [_apply(g, model, [experts, 0], [gates, 0], mode, face, hand, title=f"Apply MoLE: {label}"), 0]
        sample = _sampler(g, model, [pos, 0], [neg, 0], [latent, 0], f"KSampler: {label}", 50, 7.5)
        images[f"image_{i}"] = [g.add("VAEDecode", f"VAE Decode: {label}", samples=[sample, 0], vae=[ckpt, 2]), 0]
    grid = g.add("MoLE_ImageGrid", labels=", ".join(label for label, _ in ABLATION), columns=3, **images)
    g.add("SaveImage", "Save ablation grid", images=[grid, 0], filename_prefix="mole_sd15_ablation")
    return g


def sdxl_three_files() -> Graph:
    """SDXL MoLE with the released three-file set (face LoRA, hand LoRA, gate file) and gate maps."""
    g = Graph()
    ckpt, pos, neg, latent = _base(g, SDXL, 1024, 1024)
    loaded = g.add("MoLE_LoadSet", "Load MoLE-SDXL (three files)", expert_1=SDXL["face"], role_1="face",
                   expert_2=SDXL["hand"], role_2="hand", gate_file=SDXL["gates"])
    apply_id = _apply(g, [ckpt, 0], [loaded, 0], [loaded, 1], record=True)
    sample = _sampler(g, [apply_id, 0], [pos, 0], [neg, 0], [latent, 0], "KSampler", 50, 7.5)
    decode = g.add("VAEDecode", samples=[sample, 0], vae=[ckpt, 2])
    g.add("SaveImage", "Save image", images=[decode, 0], filename_prefix="mole_sdxl")
    _gate_views(g, apply_id, [decode, 0], "mole_sdxl")
    return g


COMMUNITY_LORAS = ("community_finetune_a.safetensors", "community_finetune_b.safetensors")


def uncertainty_sd15() -> Graph:
    """EMoE scores of one prompt: MoLE's experts (expert disagreement) and an ensemble of models (the base and two
    community fine-tunes given as LoRAs: epistemic uncertainty)."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", "Load stage-1 checkpoint", ckpt_name=SD15["checkpoint"])
    pos = g.add("CLIPTextEncode", "Prompt", text=PROMPT, clip=[ckpt, 1])
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    experts = _load_experts(g)
    by_experts = g.add("MoLE_EnsembleFromExperts", model=[ckpt, 0], experts=[experts, 0])
    scored = g.add("MoLE_UncertaintyScore", "Expert disagreement", ensemble=[by_experts, 0], positive=[pos, 0],
                   latent=[latent, 0], seed=42)
    g.add("SaveImage", "Save disagreement map", images=[scored, 1], filename_prefix="mole_expert_disagreement")
    members = [[ckpt, 0]]
    for i, lora in enumerate(COMMUNITY_LORAS):
        loaded = g.add("LoraLoader", f"Member {i + 2}: any fine-tune LoRA of this base (models/loras)",
                       model=[ckpt, 0], clip=[ckpt, 1], lora_name=lora, strength_model=1.0, strength_clip=0.0)
        members.append([loaded, 0])
    ensemble = g.add("MoLE_EnsembleFromModels", model_1=members[0], model_2=members[1], model_3=members[2])
    scored = g.add("MoLE_UncertaintyScore", "Epistemic uncertainty", ensemble=[ensemble, 0], positive=[pos, 0],
                   latent=[latent, 0], seed=42)
    g.add("SaveImage", "Save uncertainty map", images=[scored, 1], filename_prefix="mole_uncertainty")
    # the early estimate: the disagreement computed inside the first step of a normal generation
    early = g.add("MoLE_UncertaintyEarlyEstimate", model=[ckpt, 0], ensemble=[by_experts, 0])
    neg = g.add("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=[ckpt, 1])
    sample = _sampler(g, [early, 0], [pos, 0], [neg, 0], [latent, 0], "KSampler", 50, 7.5)
    decode = g.add("VAEDecode", samples=[sample, 0], vae=[ckpt, 2])
    g.add("SaveImage", "Save image", images=[decode, 0], filename_prefix="mole_early_estimate_image")
    report = g.add("MoLE_UncertaintyReport", "Early estimate", estimate=[early, 1], images=[decode, 0])
    g.add("SaveImage", "Save early-estimate map", images=[report, 1], filename_prefix="mole_early_estimate_map")
    return g


# where the frontend lists a custom node pack's templates (ComfyUI frontend 1.32; the browser test clicks it through)
TEMPLATE_PATH = "logo menu > Browse Templates > EXTENSIONS > ComfyUI-MoLE"


@dataclass(frozen=True)
class Workflow:
    """A shipped workflow: its graph, the title its UI file is named after (ComfyUI's template browser shows a
    custom node pack's template by its file name, as title and as description), and the note inside it."""

    build: Callable[[], Graph]
    title: str
    note: str

    @property
    def ui_path(self) -> Path:
        return FOLDER / f"{self.title}.json"

    @property
    def thumbnail(self) -> Path:
        """The template browser's picture of the template: <title>.jpg beside it."""
        return FOLDER / f"{self.title}.jpg"


WORKFLOWS = {
    "mole_sd15_txt2img": Workflow(
        txt2img_sd15, "MoLE SD1.5 txt2img with gates",
        "Put the stage-1 checkpoint in models/checkpoints, the face and hand experts and the gate file in models/mole "
        "(experts may also sit in models/loras), and pick them in the loaders; no SD1.5 MoLE weights are released, "
        "train them with this pack's trainer (README). The gate-map grid shows where each expert acted (rows: steps, "
        "columns: experts; bright = gate open, colour bar on the right); the curves show the global gates per step; "
        "Apply MoLE shows on itself what it attached and any warning after a run (its info output carries the same "
        "text, for a Preview Any node)."),
    "mole_sd15_ablation": Workflow(
        ablation_sd15, "MoLE SD1.5 ablation grid",
        "One seed, six models: the base, MoLE with only the face or only the hand expert, only local (per-token) "
        "gates, only global (per-image) gates, and both (MoLE as in the paper)."),
    "mole_sdxl_three_files": Workflow(
        sdxl_three_files, "MoLE SDXL release set",
        "The authors' MoLE-SDXL release (huggingface.co/jiezhueval/MoLE-SDXL) is three files: the face LoRA "
        "(lora_sdxl_face_...safetensors) goes into expert_1 with role face, the hand LoRA (lora_sdxl_hand_...) into "
        "expert_2 with role hand, the gate file (moe_sdxl_...) into gate_file. Put all three in models/mole and the "
        "SDXL base in models/checkpoints."),
    "mole_sd15_uncertainty": Workflow(
        uncertainty_sd15, "MoLE SD1.5 EMoE uncertainty",
        "EMoE: how much an ensemble disagrees about this prompt at the first denoising step. Top: MoLE's face and "
        "hand experts (expert disagreement, not epistemic uncertainty: two specialists on one base). Middle: the "
        "base and independent fine-tunes of it, given here as two LoRAs in models/loras (any fine-tune LoRAs of the "
        "same base; pick yours in the two LoraLoader nodes; without them this branch reports a missing file and "
        "the rest still runs; the paper used 4 members). Higher = less familiar prompt. Bottom: the early "
        "estimate, computed inside the first step of a normal generation."),
}


PACK_FILE = "mole_pack.safetensors"


def pack_txt2img() -> Graph:
    """A shared pack in the SD1.5 txt2img graph: Load MoLE Pack's experts, gates and recommended settings into
    Apply MoLE (python -m trainer pack fills in a pack's names and sampler settings)."""
    g = Graph()
    ckpt, pos, neg, latent = _base(g, SD15, 512, 512)
    pack = g.add("MoLE_LoadPack", "Load MoLE Pack", pack=PACK_FILE)
    apply_id = g.add("MoLE_Apply", "Apply MoLE", model=[ckpt, 0], experts=[pack, 0], gates=[pack, 1], mode="both",
                     strength_1=1.0, strength_2=1.0, strength_3=1.0, start_percent=0.0, end_percent=1.0,
                     record_trace=False, recommended=[pack, 2])
    sample = _sampler(g, [apply_id, 0], [pos, 0], [neg, 0], [latent, 0], "KSampler", 20, 7.5, sampler="euler",
                      scheduler="normal")
    decode = g.add("VAEDecode", samples=[sample, 0], vae=[ckpt, 2])
    g.add("SaveImage", "Save image", images=[decode, 0], filename_prefix="mole_pack")
    return g          # no gate views: a pack may recommend a mode without local or global gates


# rendered without an API twin into a subfolder, which ComfyUI's template list does not scan: the model card's
# workflow, not a template
PACK = Workflow(pack_txt2img, "pack/MoLE pack txt2img",
                "A shared MoLE pack: put the pack in models/mole and the checkpoint its card names in "
                "models/checkpoints. Load MoLE Pack shows the pack's card on itself (title, base model, recommended "
                "settings); its recommended output sets Apply MoLE's mode, strengths and step range (disconnect it "
                "to use Apply MoLE's own); the KSampler holds the recommended steps, CFG, sampler and scheduler.")


def api_path(name: str) -> Path:
    return API_FOLDER / f"{name}.api.json"


def _texts(prompt: str | None, negative: str | None) -> dict[str, str]:
    """{title of a CLIPTextEncode node: its new text} for the shipped workflows' "Prompt" and "Negative prompt"."""
    return {title: text for title, text in (("Prompt", prompt), ("Negative prompt", negative)) if text is not None}


def load_api(name: str, width: int | None = None, height: int | None = None, steps: int | None = None,
             prompt: str | None = None, negative: str | None = None, cfg: float | None = None) -> dict:
    """A shipped workflow's API twin, optionally at another image size, step count, prompt, negative prompt and
    guidance scale (same graph)."""
    api = json.loads(api_path(name).read_text())
    texts = _texts(prompt, negative)
    for node in api.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update({k: v for k, v in (("width", width), ("height", height)) if v})
        if node["class_type"] == "KSampler" and steps:
            node["inputs"]["steps"] = steps
        if node["class_type"] == "KSampler" and cfg is not None:
            node["inputs"]["cfg"] = cfg
        if node["class_type"] == "CLIPTextEncode" and node["_meta"]["title"] in texts:
            node["inputs"]["text"] = texts[node["_meta"]["title"]]
    return api


def resize_ui(workflow: dict, width: int, height: int, steps: int, prompt: str | None = None,
              negative: str | None = None, cfg: float | None = None) -> dict:
    """A copy of a UI workflow at another image size and step count (and prompt, negative prompt and guidance
    scale), its graph unchanged (demo-sized variants)."""
    workflow = copy.deepcopy(workflow)
    texts = _texts(prompt, negative)
    for node in workflow["nodes"]:
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [width, height]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = steps   # seed, control after generate, steps, cfg, ...
            if cfg is not None:
                node["widgets_values"][3] = cfg
        if node["type"] == "CLIPTextEncode" and node.get("title") in texts:
            node["widgets_values"][0] = texts[node["title"]]
    return workflow


# -- API -> UI ----------------------------------------------------------------------------------------------------
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# room for what they show after a run: the image, and Apply MoLE's report (web/mole.js draws it on the node)
MIN_HEIGHT = {"SaveImage": 240, "MoLE_Apply": 520}


def _inputs(definition: dict) -> list[tuple[str, object, dict]]:
    spec = definition["input"]
    out = []
    for group in ("required", "optional"):
        for name, value in spec.get(group, {}).items():
            kind, opts = value[0], (value[1] if len(value) > 1 and isinstance(value[1], dict) else {})
            out.append((name, kind, opts))
    return out


def _is_widget(kind, opts: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            links = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(src) for src in links), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def api_to_ui(api: dict, object_info: dict, note: str = "") -> dict:
    """A UI-format workflow (what the frontend saves and loads) for an API-format graph.

    Widgets are filled in the order of the node definitions (a seed gets its 'control after generate' value),
    links get ids in order, and nodes are laid out in columns by their distance from the graph's sources.
    """
    depth = _depths(api)
    links, ui_nodes = [], []
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), name])
                outputs_links.setdefault((value[0], value[1]), []).append(len(links))
    column_y: dict[int, float] = {}
    for order, (node_id, node) in enumerate(sorted(api.items(), key=lambda kv: (depth[kv[0]], int(kv[0])))):
        definition = object_info[node["class_type"]]
        inputs, widgets, slot = [], [], 0
        for name, kind, opts in _inputs(definition):
            value = node["inputs"].get(name)
            if _is_widget(kind, opts) and not isinstance(value, list):
                widgets.append(opts.get("default") if value is None else value)
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
                continue
            link = None
            if isinstance(value, list):
                link = next(l[0] for l in links if l[3] == int(node_id) and l[4] == name)
                for l in links:
                    if l[0] == link:
                        l[4] = slot
            inputs.append({"name": name, "type": "COMBO" if isinstance(kind, list) else kind, "link": link})
            slot += 1
        outputs = [{"name": out_name, "type": out_type, "links": outputs_links.get((node_id, i), []),
                    "slot_index": i}
                   for i, (out_name, out_type) in enumerate(zip(definition["output_name"], definition["output"]))]
        height = max(46 + 24 * (len(inputs) + len(widgets)) + (24 * len(outputs) if outputs else 0),
                     MIN_HEIGHT.get(node["class_type"], 0))
        x = 40 + 380 * depth[node_id]
        y = column_y.get(depth[node_id], 40.0)
        column_y[depth[node_id]] = y + height + 40
        ui_nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [x, y], "size": [340, height],
                         "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                         "title": node["_meta"]["title"],
                         "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    ui_links = []
    for link_id, src, src_slot, dst, dst_slot in links:
        out_type = object_info[api[str(src)]["class_type"]]["output"][src_slot]
        ui_links.append([link_id, src, src_slot, dst, dst_slot, out_type])
    if note:
        note_id = len(api) + 1
        ui_nodes.append({"id": note_id, "type": "MarkdownNote", "pos": [40, -220], "size": [720, 180], "flags": {},
                         "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [], "title": "Read me",
                         "properties": {}, "widgets_values": [note]})
    return {"last_node_id": max(n["id"] for n in ui_nodes), "last_link_id": len(ui_links), "nodes": ui_nodes,
            "links": ui_links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 260]}},
            "version": 0.4}


def render(object_info: dict) -> dict[str, str]:
    """{path relative to workflows/: JSON text} of every shipped workflow: the UI file and its API twin; and the
    pack workflow's UI file."""
    def titled(workflow: Workflow) -> dict:
        api = workflow.build().api()
        for node in api.values():   # untitled nodes show their display name, as when added by hand
            if node["_meta"]["title"] == node["class_type"]:
                node["_meta"]["title"] = object_info[node["class_type"]]["display_name"] or node["class_type"]
        return api

    files = {}
    for name, workflow in WORKFLOWS.items():
        api = titled(workflow)
        files[workflow.ui_path.name] = json.dumps(api_to_ui(api, object_info, workflow.note), indent=1) + "\n"
        files[str(api_path(name).relative_to(FOLDER))] = json.dumps(api, indent=1) + "\n"
    files[str(PACK.ui_path.relative_to(FOLDER))] = json.dumps(api_to_ui(titled(PACK), object_info, PACK.note),
                                                              indent=1) + "\n"
    return files


def node_labels(object_info: dict) -> str:
    """locales/en/nodeDefs.json: this pack's node names and the display names its inputs declare, keyed as the
    frontend's i18n reads them (nodeDefs.<node>.display_name, .inputs.<input>.name)."""
    labels = {}
    for node_id, definition in sorted(object_info.items()):
        if not node_id.startswith("MoLE_"):
            continue
        inputs = {name: {"name": opts["display_name"]} for name, _, opts in _inputs(definition)
                  if opts.get("display_name") and opts["display_name"] != name}
        labels[node_id] = {"display_name": definition["display_name"], **({"inputs": inputs} if inputs else {})}
    return json.dumps(labels, indent=1, sort_keys=True) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", type=Path, default=FOLDER, help="where to write the workflow files")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import tempfile

    from .comfy_server import ComfyServer, prepare_base_dir

    with tempfile.TemporaryDirectory() as tmp:
        with ComfyServer(prepare_base_dir(Path(tmp) / "comfy")) as server:
            object_info = server.get("/object_info")
    for name, text in render(object_info).items():
        path = args.output_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        log.info("wrote %s", path)
    LOCALE.parent.mkdir(parents=True, exist_ok=True)
    LOCALE.write_text(node_labels(object_info))
    log.info("wrote %s", LOCALE)
    return 0
