"""The pictures people look at before they read: the template browser's thumbnails (workflows/*.jpg) and the
README's screenshots (docs/images/), rendered from the demo's trained files in a real ComfyUI and its frontend.

    python -m trainer pictures [--output_dir demo_output] [--ui]

Runs the demo-sized SD1.5 workflows through the server (the demo's files are built first if missing), composes
a thumbnail per template from their outputs (the SDXL template, which has no demo files, gets a diagram of what it
wires), and screenshots the txt2img graph after a run in headless Chromium (Debian's `chromium`; Playwright drives
it). With `--ui` only the pictures of the frontend that need no trained file: Apply MoLE showing its warnings
(stand-in experts loaded under swapped roles), the pack's template cards, and the SDXL diagram. Needs the dev
requirements (requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..harness.host import REPO_ROOT
from ..harness.workflows import WORKFLOWS, load_api, resize_ui

log = logging.getLogger("mole.demo")
IMAGES = REPO_ROOT / "docs" / "images"
THUMBNAIL = 512
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# the frontend draws nodes without text below this zoom; screenshots are taken on a wide page at a higher zoom
SCREEN_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                   "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", type=Path, default=REPO_ROOT / "demo_output",
                        help="the demo's folder (built there first if its files are missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--ui", action="store_true", help="only the frontend's pictures that need no demo: the node "
                        "with a warning, the template cards, the SDXL template's diagram (a minute)")
    parser.set_defaults(run=run)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled to fit the box, nearest for small pictures (a 64-px render stays crisp), centred on white."""
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.NEAREST if scale >= 2 else Image.LANCZOS
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(image.resize(size, resample), ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


def _stack(parts: list[Image.Image], caption: str) -> Image.Image:
    """A square thumbnail: the parts one below the other, a caption at the bottom."""
    font = ImageFont.load_default(size=20)
    canvas = Image.new("RGB", (THUMBNAIL, THUMBNAIL), "white")
    room = (THUMBNAIL - 36) // len(parts)
    for i, part in enumerate(parts):
        canvas.paste(_fit(part, THUMBNAIL - 16, room - 8), (8, 4 + i * room))
    ImageDraw.Draw(canvas).text((THUMBNAIL / 2, THUMBNAIL - 18), caption, fill="black", font=font, anchor="mm")
    return canvas


def _outputs(server, name: str, steps: int, cfg: float) -> dict[str, Path]:
    """Run a shipped workflow at demo size; {Save Image title: the picture it wrote}. Nodes whose files are not
    there (the uncertainty workflow's fine-tune LoRAs) are left out of the graph."""
    from .pipeline import DEMO_TEXTS

    api = load_api(name, 64, 64, steps, cfg=cfg, **DEMO_TEXTS)
    dropped = {k for k, v in api.items() if v["class_type"] == "LoraLoader"}
    while True:             # and everything downstream of them
        more = {k for k, v in api.items() if k not in dropped
                and any(isinstance(x, list) and x[0] in dropped for x in v["inputs"].values())}
        if not more:
            break
        dropped |= more
    api = {k: v for k, v in api.items() if k not in dropped}
    outputs = server.run(api)
    return {api[node]["_meta"]["title"]: path for node in outputs if node in api
            for path in server.output_files({node: outputs[node]})}


def thumbnails(server, steps: int, cfg: float) -> dict[str, Image.Image]:
    txt2img = _outputs(server, "mole_sd15_txt2img", steps, cfg)
    ablation = _outputs(server, "mole_sd15_ablation", steps, cfg)
    uncertainty = _outputs(server, "mole_sd15_uncertainty", steps, cfg)
    return {
        "mole_sd15_txt2img": (_stack([_open(txt2img["Save gate overlay"]), _open(txt2img["Save gate curves"])],
                                     "image, face and hand gates; global gates per step"), txt2img),
        "mole_sd15_ablation": (_stack([_open(ablation["Save ablation grid"])], "base, experts and gate ablations"),
                               ablation),
        "mole_sd15_uncertainty": (_stack([_open(uncertainty["Save image"]),
                                          _open(uncertainty["Save disagreement map"])],
                                         "image and where the experts disagree"), uncertainty),
    }


def _page(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=60_000)
    for key, value in SCREEN_SETTINGS.items():
        page.evaluate("([k, v]) => window.app.extensionManager.setting.set(k, v)", [key, value])
    return page


# The nodes' bounding box on the page, in CSS pixels of the canvas (LiteGraph: screen = (pos + offset) * scale).
_GRAPH_BOX = """() => {
  const ds = window.app.canvas.ds, nodes = window.app.graph._nodes, title = 30;
  const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
  const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
  return [x0, y0, x1, y1].map((v, i) => (v + ds.offset[i % 2]) * ds.scale);
}"""


def graph_screenshot(browser, server, workflow: dict, path: Path, run: bool) -> None:
    """The workflow loaded in the frontend, fitted to the page; with `run`, after it ran (outputs on the nodes)."""
    page = _page(browser, server)
    try:
        page.evaluate("([wf]) => window.app.loadGraphData(wf, true, true, 'MoLE')", [workflow])
        if run:
            done = len(server.get("/history"))
            page.get_by_role("button", name="Run", exact=True).first.click()
            page.wait_for_function(f"fetch('/history').then(r => r.json()).then(h => Object.keys(h).length > {done})",
                                   timeout=240_000, polling=500)
            page.wait_for_timeout(2500)
        page.evaluate("window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        page.wait_for_timeout(800)
        canvas = page.locator("canvas#graph-canvas").bounding_box()
        x0, y0, x1, y1 = page.evaluate(_GRAPH_BOX)
        margin = 12
        page.screenshot(path=str(path), clip={"x": canvas["x"] + x0 - margin, "y": canvas["y"] + y0 - margin,
                                              "width": x1 - x0 + 2 * margin, "height": y1 - y0 + 2 * margin})
    finally:
        page.close()


def sdxl_diagram() -> Image.Image:
    """The SDXL template's thumbnail: what it wires, as boxes and arrows (the template has no demo files to render
    from, and a screenshot of its graph is unreadable at card size)."""
    canvas = Image.new("RGB", (THUMBNAIL, THUMBNAIL), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = ImageFont.load_default(size=21), ImageFont.load_default(size=15)
    draw.text((THUMBNAIL / 2, 28), "MoLE on SDXL: the released files", fill="black", font=big, anchor="mm")
    boxes = [((16, 60, 170, 130), "#f6d2c4", "face LoRA", "alpha 64"),
             ((179, 60, 333, 130), "#cfe3f7", "hand LoRA", "alpha 128"),
             ((342, 60, 496, 130), "#e4e4e4", "gate file", "moe_sdxl_..."),
             ((16, 170, 496, 230), "#ececec", "Load MoLE Three-File Set", "roles face and hand"),
             ((16, 280, 226, 350), "#e4e4e4", "SDXL base", "sd_xl_base_1.0"),
             ((276, 280, 496, 350), "#d9ecd0", "Apply MoLE", "gates per token"),
             ((196, 410, 496, 480), "#fff2c2", "image + gate maps", "face and hand, per step")]
    for (x0, y0, x1, y1), fill, title, note in boxes:
        draw.rounded_rectangle((x0, y0, x1, y1), radius=12, fill=fill, outline="#444", width=2)
        draw.text(((x0 + x1) / 2, y0 + 22), title, fill="black", font=big, anchor="mm")
        draw.text(((x0 + x1) / 2, y1 - 16), note, fill="#333", font=small, anchor="mm")
    for start, end in (((93, 130), (93, 170)), ((256, 130), (256, 170)), ((419, 130), (419, 170)),
                       ((386, 230), (386, 280)), ((226, 315), (276, 315)), ((386, 350), (386, 410))):
        draw.line((start, end), fill="#444", width=3)
        (x0, y0), (x1, y1) = start, end
        length = max(1.0, ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5)
        ux, uy = (x1 - x0) / length, (y1 - y0) / length
        draw.polygon([(x1, y1), (x1 - 12 * ux + 6 * uy, y1 - 12 * uy - 6 * ux),
                      (x1 - 12 * ux - 6 * uy, y1 - 12 * uy + 6 * ux)], fill="#444")
    return canvas


ICON = IMAGES / "icon.png"


def icon(size: int = 128) -> Image.Image:
    """The pack's icon (pyproject's [tool.comfy] Icon): a face and a raised hand of the demo world, each on the
    colour of its expert in the gate maps (face orange, hand blue), drawn at 4x and scaled down."""
    from .world import HAIRS, SHIRTS, SKINS, draw_face, draw_hand

    big = size * 4
    canvas = Image.new("RGB", (big, big), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rounded_rectangle((0, 0, big / 2 + 8, big - 1), radius=big // 8, fill=(246, 178, 140))
    draw.rounded_rectangle((big / 2 - 8, 0, big - 1, big - 1), radius=big // 8, fill=(150, 196, 238))
    draw.rectangle((big / 2 - 8, 0, big / 2 + 8, big - 1), fill=(246, 178, 140))
    draw_face(draw, big * 0.27, big * 0.5, big * 0.2, SKINS["tan"], HAIRS["brown"])
    draw_hand(draw, big * 0.74, big * 0.55, big * 0.36, SKINS["tan"], cuff=SHIRTS["yellow"])
    return canvas.resize((size, size), Image.LANCZOS)


# A node's box on the page, in CSS pixels of the canvas, with room for its title bar.
_NODE_BOX = """(id) => {
  const ds = window.app.canvas.ds, n = window.app.graph.getNodeById(id), title = 30;
  return [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]
    .map((v, i) => (v + ds.offset[i % 2]) * ds.scale);
}"""


def warning_screenshot(browser, server, path: Path) -> None:
    """The shipped txt2img template at demo size with the face and hand files swapped in Load MoLE Experts, run
    with the Run button: Apply MoLE with its warnings on the node (web/mole.js) and the run's toast."""
    workflow = resize_ui(json.loads(WORKFLOWS["mole_sd15_txt2img"].ui_path.read_text()), 64, 64, 3)
    for node in workflow["nodes"]:
        if node["type"] == "MoLE_LoadExperts":
            values = node["widgets_values"]
            values[0], values[2] = values[2], values[0]          # expert_1 <-> expert_2, roles unchanged
    page = _page(browser, server)
    try:
        page.evaluate("([wf]) => window.app.loadGraphData(wf, true, true, 'MoLE')", [workflow])
        page.get_by_role("button", name="Run", exact=True).first.click()
        page.wait_for_selector(".mole-report .mole-warning", timeout=240_000)
        page.wait_for_selector(".p-toast-message", timeout=60_000)
        node = page.evaluate("window.app.graph._nodes.find(n => n.type === 'MoLE_Apply').id")
        page.evaluate("(id) => { const c = window.app.canvas, n = window.app.graph.getNodeById(id);"
                      " c.ds.scale = 1.3; c.ds.offset = [240 / 1.3 - n.pos[0], 140 / 1.3 - n.pos[1]];"
                      " c.setDirty(true, true); }", node)
        page.wait_for_timeout(1000)
        canvas = page.locator("canvas#graph-canvas").bounding_box()
        x0, y0, x1, y1 = page.evaluate(_NODE_BOX, node)
        toast = page.locator(".p-toast-message").first.bounding_box()
        margin = 16
        left, top = canvas["x"] + x0 - margin, min(canvas["y"] + y0, toast["y"]) - margin
        right = max(canvas["x"] + x1, toast["x"] + toast["width"]) + margin
        bottom = max(canvas["y"] + y1, toast["y"] + toast["height"]) + margin
        page.screenshot(path=str(path), clip={"x": left, "y": top, "width": right - left, "height": bottom - top})
    finally:
        page.close()


def templates_screenshot(browser, server, path: Path) -> None:
    """The template browser on this pack's cards, reached by TEMPLATE_PATH."""
    page = _page(browser, server)
    try:
        page.locator(".comfyui-logo").click()
        page.get_by_role("menuitem", name="Browse Templates", exact=True).click()
        page.get_by_role("button", name="ComfyUI-MoLE", exact=True).click()
        page.locator("[data-testid^='template-workflow-'] img").last.wait_for(timeout=30_000)
        page.wait_for_timeout(1500)
        page.locator(".p-dialog").first.screenshot(path=str(path))
    finally:
        page.close()


def ui_pictures(chromium: str) -> None:
    """--ui: the frontend's pictures from stand-in files in a temporary ComfyUI folder."""
    import tempfile

    from playwright.sync_api import sync_playwright

    from ..harness.comfy_server import ComfyServer, prepare_base_dir
    from ..harness.host import use_comfy
    from ..harness.tiny_models import write_detectable_checkpoint, write_stand_in_files
    from ..harness.workflows import SD15

    use_comfy()
    sdxl = WORKFLOWS["mole_sdxl_three_files"]
    sdxl_diagram().save(sdxl.thumbnail, quality=90)
    icon().save(ICON)
    with tempfile.TemporaryDirectory(prefix="mole-ui-pictures-") as tmp:
        models = Path(tmp) / "models"
        checkpoint = write_detectable_checkpoint(models / SD15["checkpoint"], seed=0)
        mole = {role: models / SD15[role] for role in ("face", "hand", "gates")}
        write_stand_in_files("SD15", mole)
        base = prepare_base_dir(Path(tmp) / "comfy", {"checkpoints": [checkpoint], "mole": list(mole.values())})
        with ComfyServer(base) as server, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            warning_screenshot(context, server, IMAGES / "node_warning.png")
            templates_screenshot(context, server, IMAGES / "template_cards.png")
            browser.close()
    for path in (sdxl.thumbnail, ICON, IMAGES / "node_warning.png", IMAGES / "template_cards.png"):
        log.info("wrote %s (%s)", path, "x".join(map(str, _open(path).size)))


def run(args: argparse.Namespace) -> int:
    from playwright.sync_api import sync_playwright

    IMAGES.mkdir(parents=True, exist_ok=True)
    if args.ui:
        ui_pictures(args.chromium)
        return 0
    from ..harness.comfy_server import ComfyServer
    from .pipeline import DEMO_TEXTS, FULL, comfy_base, prepare

    _, models = prepare(Path(args.output_dir).resolve(), FULL, args.seed)
    base = comfy_base(Path(args.output_dir).resolve(), models)
    with ComfyServer(base) as server, sync_playwright() as playwright:
        made = thumbnails(server, FULL.sample_steps, FULL.cfg)
        for name, (picture, _) in made.items():
            picture.save(WORKFLOWS[name].thumbnail, quality=90)
        txt2img = made["mole_sd15_txt2img"][1]
        shutil.copy2(txt2img["Save gate maps (steps x experts)"], IMAGES / "gate_grid.png")
        shutil.copy2(txt2img["Save gate overlay"], IMAGES / "gate_overlay.png")
        shutil.copy2(txt2img["Save gate curves"], IMAGES / "gate_curves.png")
        shutil.copy2(made["mole_sd15_ablation"][1]["Save ablation grid"], IMAGES / "ablation.png")
        results = Path(args.output_dir).resolve() / "results"
        # the demo's evidence figures: held-out scenes with gate maps, the generations across models (the contact
        # sheet of the generation table) and the global gates while generating
        for source, name in (("heldout_gate_overlay.png", "demo_heldout_gate_overlay.png"),
                             ("generation/contact_sheet.png", "demo_generations.png"),
                             ("generated_gates.png", "demo_generated_gates.png")):
            if (results / source).exists():
                shutil.copy2(results / source, IMAGES / name)
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 2600, "height": 1300})
        demo = resize_ui(json.loads(WORKFLOWS["mole_sd15_txt2img"].ui_path.read_text()), 64, 64, FULL.sample_steps,
                         cfg=FULL.cfg, **DEMO_TEXTS)
        shot = IMAGES / "txt2img_graph.png"
        graph_screenshot(context, server, demo, shot, run=True)
        graph = _open(shot)
        if graph.width > 1600:
            graph.resize((1600, round(graph.height * 1600 / graph.width)), Image.LANCZOS).save(shot)
        sdxl_diagram().save(WORKFLOWS["mole_sdxl_three_files"].thumbnail, quality=90)
        browser.close()
    for path in [w.thumbnail for w in WORKFLOWS.values()] + sorted(IMAGES.glob("*.png")):
        log.info("wrote %s (%s)", path, "x".join(map(str, _open(path).size)))
    return 0
