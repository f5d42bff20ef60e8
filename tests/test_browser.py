"""The web extension (``web/js/``) in a real browser: headless Chromium loads ComfyUI's frontend from the test
server, queues a workflow through the frontend, and reads each node's text back from the node's widget and DOM.

Needs Debian's ``chromium`` + ``chromium-driver`` and the ``selenium`` package (the ``dev`` extra; CI installs the
browser with ``.ci/install_browser.sh``). Without them the test is skipped with one line; with env
``QUA2SEDIMO_REQUIRE_BROWSER`` set (CI) it fails instead. A screenshot of the canvas is kept under
``test-output/browser/`` (or ``$QUA2SEDIMO_TEST_OUTPUT/browser/``); its path is printed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest
import workflow_api as wa

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
HEADLESS_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000")
EXTENSION = "Qua2SeDiMo.NodeText"
WIDGET = "qua2sedimo_text"
STEM = "1. Quantize W4 and sample"


def _browser_missing() -> str | None:
    missing = []
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if not any(Path(p).exists() for p in CHROMIUM) and not shutil.which("chromium"):
        missing.append("chromium")
    if not Path(CHROMEDRIVER).exists():
        missing.append(CHROMEDRIVER)
    if not missing:
        return None
    return f"browser test needs {', '.join(missing)}: run `sudo bash .ci/install_browser.sh` (Debian/Ubuntu)"


def _require_browser() -> None:
    reason = _browser_missing()
    if reason is None:
        return
    if (os.environ.get("QUA2SEDIMO_REQUIRE_BROWSER") or "").strip().lower() not in ("", "0", "false", "no", "off"):
        pytest.fail(f"QUA2SEDIMO_REQUIRE_BROWSER is set but {reason}", pytrace=False)
    pytest.skip(reason)


def _output_dir() -> Path:
    root = Path(os.environ.get("QUA2SEDIMO_TEST_OUTPUT") or Path(__file__).resolve().parent.parent / "test-output")
    out = root / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def browser(tmp_path):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for flag in HEADLESS_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _console_errors(driver) -> str:
    try:
        return "\n".join(e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE")
    except Exception:  # a driver without the log endpoint
        return ""


def _wait(driver, script: str, what: str, timeout: float, *args):
    t0 = time.monotonic()
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not after {timeout:.0f} s\nbrowser console errors:\n"
                                 f"{_console_errors(driver)}")
        time.sleep(0.5)


_APP = ("const app = window.comfyAPI?.app?.app;"
        "const byId = id => app.graph._nodes.find(n => String(n.id) === String(id));")
_WIDGET_TEXTS = f"""Object.fromEntries(app.graph._nodes.filter(n => n.type.startsWith('Qua2SeDiMo'))
  .map(n => [String(n.id), n.widgets?.find(w => w.name === '{WIDGET}')?.value ?? null]))"""
_DOM_TEXTS = ("return [...document.querySelectorAll('textarea[data-qua2sedimo=\"text\"]')]"
              ".map(e => [e.value, e.readOnly]);")


def _history_texts(server, graph: dict, before: set[str], timeout: float = 600.0) -> dict[str, str]:
    """{node id: its ui text, lines joined} of the first prompt to finish that is not in ``before``."""
    ours = {nid for nid, node in graph.items() if node["class_type"].startswith("Qua2SeDiMo")}
    t0 = time.monotonic()
    while True:
        done = [e for pid, e in (server.get("/history") or {}).items()
                if pid not in before and (e.get("status") or {}).get("completed")]
        if done:
            entry = min(done, key=lambda e: e["prompt"][0])  # prompt = [number, id, graph, ...]
            return {nid: "\n".join(out["text"]) for nid, out in (entry.get("outputs") or {}).items()
                    if nid in ours and out.get("text")}
        assert time.monotonic() - t0 < timeout, f"the prompt queued by the browser did not finish in {timeout:.0f} s"
        time.sleep(0.5)


def _wait_for_new_prompt(server, before: set[str], driver, timeout: float = 60.0) -> None:
    """Fail fast when the browser's prompt never reached the server (the frontend reports errors only in its UI)."""
    t0 = time.monotonic()
    while True:
        queue = server.get("/queue") or {}
        ids = {item[1] for key in ("queue_running", "queue_pending") for item in queue.get(key, [])}
        if (ids | set(server.get("/history") or {})) - before:
            return
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"the browser's prompt did not reach the server in {timeout:.0f} s\n"
                                 f"browser console errors:\n{_console_errors(driver)}")
        time.sleep(0.5)


@pytest.mark.comfy_server
@pytest.mark.slow
def test_node_text_shows_on_the_nodes(browser, comfy_server):
    graph = wa.twin(STEM)
    # a graph no other test queues: ComfyUI 0.33 keeps no ui output in the history of a node served from its
    # cache, so sharing nodes with tests/test_workflows.py would hide the text from whichever runs second
    (uniform,) = [n for n in graph.values() if n["class_type"] == "Qua2SeDiMoUniformConfig"]
    uniform["inputs"]["option"] = "uaq-3"
    # no first-run template browser and no missing-model dialogs over the canvas
    comfy_server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                                    "Comfy.Workflow.ShowMissingNodesWarning": False})
    browser.get(comfy_server.url)
    # started: our extension registered and the default workflow loaded (ours must not be replaced by it later)
    _wait(browser, _APP + f"""return !!(app && app.graph && app.graph._nodes.length > 0
          && (app.extensions || []).some(e => e.name === '{EXTENSION}'));""",
          f"the frontend with the {EXTENSION} extension and its default workflow", 120)

    before = set(comfy_server.get("/history") or {})
    # the frontend builds the graph and queues it (as the Run button does); the server's `executed` messages
    # reach the page over its websocket and the extension fills each node's text box
    queued = browser.execute_async_script(_APP + """
const [graph, done] = arguments;
(async () => {
  await app.loadApiJson(graph, 'browser-test.json');
  const types = app.graph._nodes.map(n => n.type).sort();
  if (JSON.stringify(types) !== JSON.stringify(Object.values(graph).map(n => n.class_type).sort()))
    return done('the loaded graph is not the test graph: ' + types);
  await app.queuePrompt(0, 1);
  done('ok');
})().catch(e => done('error: ' + e + '\\n' + e.stack));""", graph)
    assert queued == "ok", queued
    _wait_for_new_prompt(comfy_server, before, browser)
    expected_nodes = {nid for nid, n in graph.items()
                      if n["class_type"] in ("Qua2SeDiMoUniformConfig", "Qua2SeDiMoApplyConfig")}
    shown = _wait(browser, _APP + f"const t = {_WIDGET_TEXTS}; return arguments[0].every(id => t[id]) ? t : null;",
                  "the nodes' text after the run", 600, sorted(expected_nodes))

    texts = _history_texts(comfy_server, graph, before)
    assert set(texts) >= expected_nodes, texts
    for nid in expected_nodes:  # what the server sent is what the node shows
        assert shown[nid] == texts[nid], (nid, shown[nid], texts[nid])
    apply_id = next(nid for nid in expected_nodes if graph[nid]["class_type"] == "Qua2SeDiMoApplyConfig")
    assert shown[apply_id].startswith("b̄ = 3."), shown[apply_id]
    dom = browser.execute_script(_DOM_TEXTS)
    assert sorted(v for v, _ in dom) == sorted(texts[n] for n in expected_nodes), dom
    assert all(read_only for _, read_only in dom), "the node text must be read-only"

    shot = _output_dir() / f"node-text-{comfy_server.system_stats()['system']['comfyui_version']}.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 0

    # the text box is neither a prompt input nor a widget value of the saved workflow
    prompt = browser.execute_async_script(_APP + "const done = arguments[0];"
                                          "app.graphToPrompt().then(p => done(JSON.stringify(p)));")
    assert WIDGET not in prompt

    # multi-line text is kept line for line, and every run replaces the previous text
    lines = ["first line", "  second line, indented", "", "fourth: ü ✓"]
    replaced = browser.execute_script(_APP + f"""
const node = byId(arguments[0]);
node.onExecuted({{text: arguments[1]}});
return node.widgets.find(w => w.name === '{WIDGET}').value;""", apply_id, lines)
    assert replaced == "\n".join(lines)
    assert "\n".join(lines) in [v for v, _ in browser.execute_script(_DOM_TEXTS)]

    # a saved and reloaded workflow shows the last text again, marked as restored
    restored = browser.execute_async_script(_APP + f"""
const [id, done] = arguments;
(async () => {{
  const saved = JSON.parse(JSON.stringify(app.graph.serialize()));
  await app.loadGraphData(saved);
  const node = byId(id);
  done([node.widgets.find(w => w.name === '{WIDGET}')?.value ?? null,
        saved.nodes.find(n => String(n.id) === String(id)).widgets_values]);
}})().catch(e => done('error: ' + e));""", apply_id)
    assert isinstance(restored, list), restored
    value, widgets_values = restored
    assert value is not None and value.startswith("(last run") and value.endswith("\n".join(lines)), value
    assert widgets_values == [graph[apply_id]["inputs"]["act_bits"], graph[apply_id]["inputs"]["config_file"]]


_SIMULATED_TEXT = ["line one of a run", "line two", "line three"]
THUMB_SIDE = 384  # px, square: the template browser shows thumbnails in square cards


def _node_boxes(driver, ui: dict) -> list:
    """Load UI workflow ``ui`` in the frontend, give each of our nodes a text box as a run does, and return every
    node's box [id, type, x, y, w, h] as drawn (title bar included; never smaller than the frontend's own size)."""
    return driver.execute_async_script(_APP + """
const [ui, lines, done] = arguments;
(async () => {
  await app.loadGraphData(ui);
  for (const n of app.graph._nodes) if (n.type.startsWith('Qua2SeDiMo')) n.onExecuted({text: lines});
  const T = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  done(app.graph._nodes.map(n => { const c = n.computeSize();
    return [String(n.id), n.type, n.pos[0], n.pos[1] - T, Math.max(n.size[0], c[0]),
            Math.max(n.size[1], c[1]) + T]; }));
})().catch(e => done('error: ' + e));""", ui, _SIMULATED_TEXT)


def _overlaps(boxes: list) -> list[str]:
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a[2] < b[2] + b[4] and b[2] < a[2] + a[4] and a[3] < b[3] + b[5] and b[3] < a[3] + a[5]:
                out.append(f"{a[1]} #{a[0]} overlaps {b[1]} #{b[0]}")
    return out


def _write_thumbnail(driver, boxes: list, path: Path) -> None:
    """Fit the loaded graph into a square in the middle of the page and save that square, downscaled, as JPEG."""
    from PIL import Image

    x0, y0 = min(b[2] for b in boxes), min(b[3] for b in boxes)
    x1, y1 = max(b[2] + b[4] for b in boxes), max(b[3] + b[5] for b in boxes)
    width, height = driver.execute_script("return [window.innerWidth, window.innerHeight];")
    side = min(width, height) - 260
    sx, sy = (width - side) // 2, (height - side) // 2 + 40
    driver.execute_script(_APP + """
const [x0, y0, w, h, sx, sy, side] = arguments;
const rect = app.canvas.canvas.getBoundingClientRect();
const scale = 0.96 * Math.min(side / w, side / h);
app.canvas.ds.scale = scale;
app.canvas.ds.offset[0] = (sx - rect.left + (side - w * scale) / 2) / scale - x0;
app.canvas.ds.offset[1] = (sy - rect.top + (side - h * scale) / 2) / scale - y0;
app.canvas.setDirty(true, true);""", x0, y0, x1 - x0, y1 - y0, sx, sy, side)
    time.sleep(1.0)  # a few frames: the canvas and the DOM widgets follow the new transform
    png = _output_dir() / f"{path.stem}.png"
    driver.save_screenshot(str(png))
    with Image.open(png) as img:
        ratio = img.width / width  # device pixels per CSS pixel
        box = tuple(round(v * ratio) for v in (sx, sy, sx + side, sy + side))
        img.convert("RGB").crop(box).resize((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS).save(
            path, "JPEG", quality=80, optimize=True)


@pytest.mark.comfy_server
def test_templates_in_the_browser(browser, comfy_server):
    """Every template, as the frontend lays it out after a run (each of our nodes with its text box): no node
    covers another; its thumbnail loads from the server. QUA2SEDIMO_WRITE_THUMBNAILS=1 rewrites the thumbnails
    (workflows/<stem>.jpg) from these renderings."""
    comfy_server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                                    "Comfy.Workflow.ShowMissingNodesWarning": False, "Comfy.Minimap.Visible": False,
                                    "LiteGraph.Canvas.MinFontSizeForLOD": 1})  # full detail when zoomed out
    browser.get(comfy_server.url)
    _wait(browser, _APP + "return !!(app && app.graph && app.graph._nodes.length > 0);", "the frontend", 120)
    stems = sorted(comfy_server.get("/workflow_templates")["qua2sedimo"])
    assert stems == sorted(wa.ui_workflows())
    problems = []
    for stem in stems:
        boxes = _node_boxes(browser, wa.ui_workflows()[stem])
        assert isinstance(boxes, list), boxes
        problems += [f"{stem}: {p}" for p in _overlaps(boxes)]
        if os.environ.get("QUA2SEDIMO_WRITE_THUMBNAILS"):
            _write_thumbnail(browser, boxes, wa.UI_DIR / f"{stem}.jpg")
        url = f"/api/workflow_templates/qua2sedimo/{urllib.parse.quote(stem)}.jpg"  # where the frontend looks
        size = browser.execute_async_script("""const [url, done] = arguments; const img = new Image();
img.onload = () => done([img.naturalWidth, img.naturalHeight]); img.onerror = () => done(null); img.src = url;""", url)
        if size != [THUMB_SIDE, THUMB_SIDE]:
            problems.append(f"{stem}: thumbnail {url} loads as {size}, not {THUMB_SIDE}×{THUMB_SIDE}")
    browser.execute_script(_APP + "app.extensionManager?.command?.execute('Comfy.BrowseTemplates');")
    time.sleep(3)  # the dialog and its thumbnails
    shot = _output_dir() / f"templates-{comfy_server.system_stats()['system']['comfyui_version']}.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert not problems, "\n".join(problems)


@pytest.mark.comfy_server
def test_missing_models_offer_downloads(browser, comfy_server):
    """properties.models in a template: the frontend lists each absent public model with a download (ComfyUI 0.3.75's
    frontend in its Missing Models dialog, 0.33's in the errors panel behind "View details")."""
    stem = "3. Sample a quantized file"
    comfy_server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": True,
                                    "Comfy.Workflow.ShowMissingNodesWarning": False})
    browser.get(comfy_server.url)
    _wait(browser, _APP + "return !!(app && app.graph && app.graph._nodes.length > 0);", "the frontend", 120)
    time.sleep(1)
    browser.execute_script("document.querySelectorAll('[role=dialog] button[aria-label=Close]')"
                           ".forEach(b => b.click());")  # the default workflow's own missing models, if any
    loaded = browser.execute_async_script(_APP + "const [ui, done] = arguments;"
                                          "app.loadGraphData(ui).then(() => done('ok'), e => done('error: ' + e));",
                                          wa.ui_workflows()[stem])
    assert loaded == "ok", loaded
    wanted = [m["name"] for n in wa.ui_workflows()[stem]["nodes"] for m in n.get("properties", {}).get("models", [])]
    assert sorted(wanted) == ["clip_l.safetensors", "vae-ft-mse-840000-ema-pruned.safetensors"]

    def listed() -> bool:  # each name followed by its download button (not only named as missing)
        text = browser.execute_script("return document.body.innerText;")
        return all(w in text and "Download" in text[text.index(w) + len(w):][:30] for w in wanted)

    t0 = time.monotonic()
    while not listed() and time.monotonic() - t0 < 30:
        browser.execute_script("[...document.querySelectorAll('button')]"
                               ".filter(b => b.innerText.trim() === 'View details').forEach(b => b.click());")
        time.sleep(0.5)
    shot = _output_dir() / f"missing-models-{comfy_server.system_stats()['system']['comfyui_version']}.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert listed(), f"the frontend did not offer {wanted} for download (see {shot})"
