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
STEM = "qua2sedimo-uniform-w4-sample"


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
    assert shown[apply_id].startswith("b̄ = 4."), shown[apply_id]
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
