"""The real frontend in headless Chromium (loopback only): every MoLE template opens from the template browser
(with its thumbnail, no API twin listed, no error), reached by the README's menu path click by click, its card
title whole; each shipped UI workflow loads with no missing-node warning, is queued with the Run button and its
output image comes back to the page; the pack's extension (web/mole.js) draws Apply MoLE's summary and warnings on
the node and raises one toast for a run with warnings, without console errors and without touching other nodes; a
pack's model-card workflow (`python -m trainer pack`) loads and runs on the pack.

Needs Debian's chromium (`.ci/run` installs it). Without it the test is skipped, unless MOLE_REQUIRE_BROWSER=1
(set by CI), where a missing browser fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.parse

import pytest

from comfyui_mole.trainer.harness.workflows import TEMPLATE_PATH, WORKFLOWS, resize_ui
from test_first_minutes import graph as mole_graph

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("MOLE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (apt-get install chromium) and MOLE_REQUIRE_BROWSER=1")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        profile = tmp_path_factory.mktemp("chromium-profile")
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, args=ARGS,
                                                       headless=True, viewport={"width": 1400, "height": 900})
        yield context
        context.close()


def _open_frontend(browser, server, errors: list | None = None):
    page = browser.new_page()
    seen = []
    page.on("response", lambda r: seen.append(r.url) if "/view?" in r.url and r.ok else None)
    if errors is not None:      # console errors and uncaught exceptions, with where they come from
        page.on("console", lambda m: errors.append(f"{m.text} @ {m.location.get('url', '')}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"{e} @ {e.stack}"))
    page.goto(server.url + "/")
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=60_000)
    return page, seen


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_frontend_loads_and_runs_shipped_workflow(browser, request, name):
    server = request.getfixturevalue("sdxl_server" if "sdxl" in name else "server")
    workflow = resize_ui(json.loads(WORKFLOWS[name].ui_path.read_text()), width=64, height=64, steps=3)
    page, seen = _open_frontend(browser, server)
    try:
        _load_and_run(page, seen, server, workflow, name)
    finally:
        page.close()


def _load_and_run(page, seen, server, workflow: dict, name: str) -> None:
    """Load a UI workflow into the page (no missing node), queue it with the Run button, wait for success, and
    check that the page received every Save Image output and fetched the first to draw it."""
    page.evaluate("([wf, name]) => window.app.loadGraphData(wf, true, true, name)", [workflow, name])
    page.wait_for_timeout(1000)
    missing = page.evaluate("window.app.graph._nodes.filter(n => !window.LiteGraph.registered_node_types"
                            "[n.type]).map(n => n.type)")
    assert missing == []
    assert "missing nodes" not in page.inner_text("body")
    types = sorted({n["type"] for n in workflow["nodes"]})
    assert sorted(page.evaluate("[...new Set(window.app.graph._nodes.map(n => n.type))]")) == types

    history_before = set(server.get("/history"))
    page.get_by_role("button", name="Run", exact=True).first.click()
    deadline = time.monotonic() + 240
    prefixes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "SaveImage"]
    while time.monotonic() < deadline:
        new = {k: v for k, v in server.get("/history").items() if k not in history_before}
        done = [v for v in new.values() if v.get("status", {}).get("completed") is not None]
        if done:
            assert done[0]["status"]["status_str"] == "success", done[0]["status"]
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"{name}: the queued workflow did not finish:\n{server.log_tail()}")
    # the page received every Save Image node's output, and fetched the main image to draw it on the canvas
    page.wait_for_function(f"Object.keys(window.app.nodeOutputs || {{}}).length >= {len(prefixes)}",
                           timeout=30_000)
    received = page.evaluate("Object.values(window.app.nodeOutputs).flatMap(o => (o.images || [])"
                             ".map(i => i.filename))")
    assert all(any(f.startswith(p + "_0") for f in received) for p in prefixes), (prefixes, received)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(prefixes[0] + "_0" in u for u in seen):
        page.wait_for_timeout(250)
    assert any(prefixes[0] + "_0" in u for u in seen), (prefixes[0], seen)


def test_a_packs_model_card_workflow_loads_and_runs_in_the_frontend(browser, server, mole_files, tmp_path):
    """`python -m trainer pack` writes a pack, its model card and a workflow: dropped into the real frontend the
    workflow loads (no missing node), runs on the pack, and Load MoLE Pack shows the card on itself."""
    from test_pack_card import make_pack

    folder = server.base_dir / "models" / "mole"
    pack = make_pack(mole_files, folder, "browser_pack")
    workflow = json.loads(pack.with_name("browser_pack_workflow.json").read_text())
    # its checkpoint (the default name, mole_sd15_stage1.safetensors) is the server's detectable checkpoint
    workflow = resize_ui(workflow, width=64, height=64, steps=2)
    page, seen = _open_frontend(browser, server)
    try:
        _load_and_run(page, seen, server, workflow, "browser_pack_workflow")
        loader = next(n["id"] for n in workflow["nodes"] if n["type"] == "MoLE_LoadPack")
        page.wait_for_function(f"(window.app.nodeOutputs[{loader}] || {{}}).mole_lines", timeout=30_000)
        lines = page.evaluate(f"window.app.nodeOutputs[{loader}].mole_lines")
        assert "card: Crisp hands by A. Artist, licence openrail" in lines, lines
        shown = page.evaluate(f"window.app.graph.getNodeById({loader}).widgets.map(w => w.name)")
        assert "mole_report" in shown, shown
    finally:
        page.close()


def test_every_mole_template_opens_from_the_template_browser(browser, server):
    from comfyui_mole.trainer.harness.comfy_server import PACKAGE_DIR_NAME

    page, _ = _open_frontend(browser, server)
    thumbnails = []
    page.on("response", lambda r: thumbnails.append((r.url, r.status)) if r.url.endswith(".jpg") else None)
    try:
        for workflow in WORKFLOWS.values():
            page.evaluate("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            page.get_by_text(PACKAGE_DIR_NAME, exact=True).click()
            cards = page.locator("[data-testid^='template-workflow-']")
            cards.first.wait_for(timeout=30_000)
            listed = sorted(cards.nth(i).get_attribute("data-testid") for i in range(cards.count()))
            assert listed == sorted(f"template-workflow-{w.title}" for w in WORKFLOWS.values())   # no .api entry
            page.locator(f"[data-testid='template-workflow-{workflow.title}']").click()
            nodes = len(json.loads(workflow.ui_path.read_text())["nodes"])
            page.wait_for_function(f"window.app.graph._nodes.length === {nodes}", timeout=30_000)
            page.wait_for_timeout(500)
            body = page.inner_text("body")
            assert "Zod" not in body and "valid version" not in body and "Error" not in body, body[-2000:]
            assert page.locator(".p-toast-message-error").count() == 0
        assert {url.rsplit("/", 1)[-1] for url, status in thumbnails if status == 200} >= {
            urllib.parse.quote(w.thumbnail.name) for w in WORKFLOWS.values()}, thumbnails
    finally:
        page.close()


def _cards(page) -> list[tuple[str, int, int, int, int]]:
    """(title, scrollWidth, clientWidth, scrollHeight, clientHeight) of each template card's title element."""
    page.locator("[data-testid^='template-workflow-'] h3").first.wait_for(timeout=30_000)
    return page.evaluate("[...document.querySelectorAll(\"[data-testid^='template-workflow-'] h3\")]"
                         ".map(e => [e.innerText, e.scrollWidth, e.clientWidth, e.scrollHeight, e.clientHeight])")


def test_the_readme_template_path_opens_the_mole_templates_and_no_card_title_is_cut(browser, server):
    """The README's path (logo menu > Browse Templates > EXTENSIONS > ComfyUI-MoLE), clicked as written; then
    every card title fits at the dialog's default size for three common window sizes (the title is clamped to
    one line, so a cut title overflows in height, a long word in width)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert TEMPLATE_PATH in readme
    steps = TEMPLATE_PATH.split(" > ")
    assert steps == ["logo menu", "Browse Templates", "EXTENSIONS", "ComfyUI-MoLE"]
    for width, height in ((1400, 900), (1280, 720), (1920, 1080)):
        page, _ = _open_frontend(browser, server)
        try:
            page.set_viewport_size({"width": width, "height": height})
            page.locator(".comfyui-logo").click()
            page.get_by_role("menuitem", name=steps[1], exact=True).click()
            # the heading is "Extensions" in the page, upper-cased by its style
            page.get_by_text(re.compile(f"^{steps[2]}$", re.IGNORECASE)).first.wait_for(timeout=30_000)
            page.get_by_role("button", name=steps[3], exact=True).click()
            cards = _cards(page)
            assert sorted(c[0] for c in cards) == sorted(w.title for w in WORKFLOWS.values())
            cut = [c for c in cards if c[1] > c[2] or c[3] > c[4] + 1]
            assert not cut, (width, height, cut)
        finally:
            page.close()


def _run_in_page(page, server, g: dict, name: str) -> None:
    """Load an API-format graph into the page as a user's graph and queue it with the Run button; waits until
    the server has finished it."""
    page.evaluate("([g, name]) => window.app.loadApiJson(g, name)", [g, name])
    page.wait_for_timeout(500)
    before = set(server.get("/history"))
    page.get_by_role("button", name="Run", exact=True).first.click()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = [v for k, v in server.get("/history").items() if k not in before
                and v.get("status", {}).get("completed") is not None]
        if done:
            assert done[0]["status"]["status_str"] == "success", done[0]["status"]
            return
        time.sleep(0.3)
    pytest.fail(f"{name}: the run did not finish:\n{server.log_tail()}")


def _report(page) -> dict:
    page.wait_for_function("document.querySelector('.mole-report') && "
                           "document.querySelector('.mole-report').innerText.length > 0", timeout=30_000)
    page.wait_for_timeout(1000)                 # the run's end event and its toast, if any
    return page.evaluate("""(() => {
        const nodes = window.app.graph._nodes;
        const apply = nodes.find(n => n.type === 'MoLE_Apply');
        const widget = apply.widgets.find(w => w.name === 'mole_report');
        const box = widget.element.getBoundingClientRect();
        return {text: widget.element.innerText, serialized: widget.serialize,
                warnings: [...widget.element.querySelectorAll('.mole-warning')].map(e => e.innerText),
                colour: [...widget.element.querySelectorAll('.mole-warning')].map(e => getComputedStyle(e).color),
                visible: box.width > 100 && box.height > 20,
                saved: JSON.stringify(window.app.graph.serialize()).includes('mole_report'),
                others: nodes.filter(n => !n.type.startsWith('MoLE_') &&
                                     (n.widgets || []).some(w => w.name === 'mole_report')).map(n => n.type),
                patched: Object.entries(window.LiteGraph.registered_node_types)
                    .filter(([t, c]) => !t.startsWith('MoLE_') && String(c.prototype.onExecuted || '')
                            .includes('mole_')).map(([t]) => t),
                extension: window.app.extensions.some(e => e.name === 'ComfyUI-MoLE.NodeReport'),
                toasts: [...document.querySelectorAll('.p-toast-message')].map(e => e.innerText)};
    })()""")


def test_apply_mole_shows_its_summary_and_warnings_on_the_node(browser, server, detectable):
    """No Preview node in the graph: with the shipped-by-name face and hand files the node shows what it
    attached and no toast comes; with the two files swapped it shows the warnings (file names, warning colour)
    and one toast. The extension raises no console error and leaves every other node type alone."""
    errors: list[str] = []
    page, _ = _open_frontend(browser, server, errors)
    try:
        _run_in_page(page, server, mole_graph(detectable.name, prefix="browser_ok"), "matching files")
        ok = _report(page)
        assert ok["extension"] and ok["visible"], ok
        assert ok["text"].startswith("MoLE: 2 expert(s) on 36 layers (SD15)"), ok
        assert "strength_1 -> face: test_face.safetensors" in ok["text"], ok
        assert ok["warnings"] == [] and ok["toasts"] == [], ok
        assert ok["others"] == [] and ok["patched"] == [], ok
        assert ok["serialized"] is False and not ok["saved"], ok
    finally:
        page.close()
    page, _ = _open_frontend(browser, server, errors)
    try:
        _run_in_page(page, server, mole_graph(detectable.name, experts=("test_hand.safetensors",
                                                                        "test_face.safetensors"),
                                              prefix="browser_swap"), "swapped files")
        swapped = _report(page)
        assert any("test_hand.safetensors is loaded as 'face', but it was trained as the 'hand' expert" in w
                   for w in swapped["warnings"]), swapped
        assert len(swapped["warnings"]) == 2, swapped
        assert not any(str(ROOT) in w or "/tmp" in w for w in swapped["warnings"]), swapped   # names, not paths
        assert set(swapped["colour"]) == {"rgb(255, 179, 71)"}, swapped
        assert len(swapped["toasts"]) == 1 and "MoLE: " in swapped["toasts"][0] and "swapped files?" in \
            swapped["toasts"][0], swapped
        assert swapped["others"] == [], swapped
    finally:
        page.close()
    # errors raised in the extension's file or by its code (the frontend's own, e.g. the node registry it cannot
    # reach from here, name other files)
    ours = [e for e in errors if "/extensions/ComfyUI-MoLE/" in e or "mole.js" in e]
    assert ours == [], ours
