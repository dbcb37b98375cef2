"""The real frontend in headless Chromium (loopback only): every MoLE template opens from the template browser
(with its thumbnail, no API twin listed, no error); each shipped UI workflow loads with no missing-node warning,
is queued with the Run button and its output image comes back to the page.

Needs Debian's chromium (`.ci/run` installs it). Without it the test is skipped, unless MOLE_REQUIRE_BROWSER=1
(set by CI), where a missing browser fails.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse

import pytest

from comfyui_mole.trainer.harness.workflows import WORKFLOWS, resize_ui

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


def _open_frontend(browser, server):
    page = browser.new_page()
    seen = []
    page.on("response", lambda r: seen.append(r.url) if "/view?" in r.url and r.ok else None)
    page.goto(server.url + "/")
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=60_000)
    return page, seen


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_frontend_loads_and_runs_shipped_workflow(browser, request, name):
    server = request.getfixturevalue("sdxl_server" if "sdxl" in name else "server")
    workflow = resize_ui(json.loads(WORKFLOWS[name].ui_path.read_text()), width=64, height=64, steps=3)
    page, seen = _open_frontend(browser, server)
    try:
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
