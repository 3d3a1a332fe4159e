"""The chain's notebooks, proven in a real JupyterLab driven by Debian's Chromium.

For every registered step, in order: open its notebook in JupyterLab (headless Chromium, served on
loopback), Run All with the tiny run's artifacts, wait until the kernel is idle, then check that no
output area shows an error (in the page, and in the notebook as JupyterLab saves it) and that every
code cell ran; save a screenshot. In notebook 03 the head explorer must render as ipywidgets
(layer / head / token sliders, a sample picker, the figure) and redraw its figure when the head
slider moves. Screenshots go to ``runs/browser_screenshots/`` (or ``SPARSEMM_SCREENSHOT_DIR``).
See conftest.py for the server, the browser and the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import nbformat
import pytest

from sparsemm_utils import pipeline as pl
from sparsemm_utils.runs import resolve_run_dir

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Longest a notebook may take to run in the browser on the tiny run (2 shared CPU cores).
NOTEBOOK_TIMEOUT_S = 420
EXPLORER_STEP = "03_head_scoring"
STDERR = "application/vnd.jupyter.stderr"

# What the runs left behind, shared between the tests (the explorer test reads the 03 run's).
_RESULTS: dict[str, dict] = {}


def screenshot_dir() -> Path:
    """``SPARSEMM_SCREENSHOT_DIR`` or ``runs/browser_screenshots/`` (created)."""

    path = Path(os.environ.get("SPARSEMM_SCREENSHOT_DIR") or resolve_run_dir("runs/browser_screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _by():
    from selenium.webdriver.common.by import By

    return By


def _wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # a stale element while JupyterLab re-renders: try again
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def _session(lab, name: str) -> dict | None:
    for session in lab.api("/api/sessions"):
        if session.get("path", "").endswith(name):
            return session
    return None


def _kernel_state(lab, name: str) -> str | None:
    session = _session(lab, name)
    return session["kernel"]["execution_state"] if session else None


def _open(driver, lab, name: str, n_cells: int) -> None:
    By = _by()
    driver.get(f"{lab.url}/lab/tree/{name}?token={lab.token}&reset")
    _wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell")) == n_cells, 180,
              f"{name} to show its {n_cells} cells")
    _wait_for(lambda: _kernel_state(lab, name) == "idle", 180, f"the kernel of {name} to start")


def _menu(driver, label: str, command: str) -> None:
    By = _by()
    bar = [m for m in driver.find_elements(By.CSS_SELECTOR, "#jp-MainMenu .lm-MenuBar-item") if m.text.strip() == label]
    assert bar, f"JupyterLab has no '{label}' menu"
    bar[0].click()
    item = _wait_for(
        lambda: [i for i in driver.find_elements(By.CSS_SELECTOR, f'.lm-Menu-item[data-command="{command}"]') if i.is_displayed()],
        20, f"the menu item {command}",
    )
    item[0].click()


def _prompts(driver) -> list[str]:
    By = _by()
    return [e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell .jp-InputPrompt")]


def _page_errors(driver) -> list[str]:
    """Texts of the output areas that show a traceback (an error is rendered as stderr)."""
    By = _by()
    found = []
    for element in driver.find_elements(
        By.CSS_SELECTOR, f'.jp-OutputArea-output[data-mime-type="{STDERR}"], .jp-RenderedText'
    ):
        text = element.text
        if "Traceback" in text:
            found.append(text[-1500:])
    return found


def _wait_until_done(driver, lab, name: str) -> float:
    """Run All was clicked: wait until no cell is queued or running and the kernel is idle (three
    polls in a row), or until an error stopped the run. Returns the seconds it took."""
    start = time.monotonic()
    _wait_for(lambda: any(p.startswith("[") and p != "[ ]:" for p in _prompts(driver)), 60, f"{name} to start running")
    stable = 0
    deadline = start + NOTEBOOK_TIMEOUT_S
    while time.monotonic() < deadline:
        prompts = _prompts(driver)
        running = any("*" in p for p in prompts)
        if not running and _kernel_state(lab, name) == "idle":
            stable += 1
            if stable >= 3:
                return time.monotonic() - start
        else:
            stable = 0
        time.sleep(1.0)
    raise TimeoutError(f"{name} did not finish within {NOTEBOOK_TIMEOUT_S} s in JupyterLab; prompts {prompts}")


def _saved_problems(path: Path) -> tuple[list[str], list[int]]:
    """(errors, code cells that never ran) of the notebook as JupyterLab saved it."""
    nb = nbformat.read(str(path), as_version=4)
    errors, not_run = [], []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.execution_count is None:
            not_run.append(i)
        for output in cell.outputs:
            if output.output_type == "error":
                errors.append(f"cell {i}: {output.ename}: {output.evalue}")
    return errors, not_run


def _shot(driver, name: str) -> Path:
    path = screenshot_dir() / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _slider(box, label: str):
    By = _by()
    for slider in box.find_elements(By.CSS_SELECTOR, ".widget-slider"):
        labels = slider.find_elements(By.CSS_SELECTOR, ".widget-label")
        if labels and labels[0].text.strip() == label:
            return slider
    return None


def _figure_digest(box) -> str | None:
    By = _by()
    images = box.find_elements(By.CSS_SELECTOR, ".widget-output img")
    if not images:
        return None
    return hashlib.sha256((images[0].get_attribute("src") or "").encode()).hexdigest()


def _explorer(driver, step: str) -> dict:
    """Find the head explorer's widget box, check its controls, move the head slider one step and
    wait for the figure to be redrawn. Returns what was seen (an ``error`` key when it failed)."""
    from selenium.webdriver.common.keys import Keys

    By = _by()
    seen: dict = {}
    try:
        boxes = _wait_for(
            lambda: [b for b in driver.find_elements(By.CSS_SELECTOR, ".widget-vbox") if _slider(b, "head") is not None],
            60, "the head explorer's widgets (layer / head / token sliders)",
        )
        box = boxes[0]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        seen["sliders"] = sorted(
            s.find_elements(By.CSS_SELECTOR, ".widget-label")[0].text.strip()
            for s in box.find_elements(By.CSS_SELECTOR, ".widget-slider")
        )
        seen["dropdown"] = bool(box.find_elements(By.CSS_SELECTOR, ".widget-dropdown select"))
        seen["play"] = bool(box.find_elements(By.CSS_SELECTOR, ".widget-play, .jupyter-widgets.widget-play"))
        before = _wait_for(lambda: _figure_digest(box), 60, "the explorer's first figure")
        seen["screenshot_before"] = str(_shot(driver, f"{step}_explorer_before"))
        slider = _slider(box, "head")
        readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
        handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
        value = int(readout.text.strip())
        maximum = int(float(handle.get_attribute("aria-valuemax")))
        key, target = (Keys.ARROW_RIGHT, value + 1) if value < maximum else (Keys.ARROW_LEFT, value - 1)
        driver.execute_script("arguments[0].focus();", handle)
        handle.send_keys(key)
        try:
            _wait_for(lambda: readout.text.strip() == str(target), 10, f"the head slider to move to {target}")
            seen["moved_by"] = "keyboard"
        except TimeoutError:  # fall back to typing into the readout
            readout.click()
            readout.send_keys(Keys.CONTROL, "a")
            readout.send_keys(str(target), Keys.ENTER)
            _wait_for(lambda: readout.text.strip() == str(target), 10, f"the head readout to show {target}")
            seen["moved_by"] = "readout"
        seen["head"] = (value, target)
        after = _wait_for(lambda: (d := _figure_digest(box)) and d != before and d, 90,
                          "the explorer's figure to be redrawn for the new head")
        seen["figure_changed"] = after != before
        seen["screenshot_after"] = str(_shot(driver, f"{step}_explorer_after"))
    except Exception as exc:  # recorded, asserted by test_head_explorer_widget_renders_and_responds
        seen["error"] = f"{type(exc).__name__}: {exc}"
        seen["screenshot_error"] = str(_shot(driver, f"{step}_explorer_error"))
    return seen


def _run_in_lab(driver, lab, step: pl.Step) -> dict:
    if step.name in _RESULTS:
        return _RESULTS[step.name]
    name = f"{step.name}.ipynb"
    path = lab.root / name
    n_cells = len(nbformat.read(str(path), as_version=4).cells)
    _open(driver, lab, name, n_cells)
    By = _by()
    driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook").click()
    _menu(driver, "Run", "runmenu:run-all")
    seconds = _wait_until_done(driver, lab, name)
    result = {"seconds": round(seconds, 1), "page_errors": _page_errors(driver)}
    written = path.stat().st_mtime_ns
    _menu(driver, "File", "docmanager:save")
    _wait_for(lambda: path.stat().st_mtime_ns != written, 60, f"JupyterLab to save {name}")
    time.sleep(1.0)
    result["saved_errors"], result["not_run"] = _saved_problems(path)
    if result["page_errors"]:
        first = driver.find_elements(By.CSS_SELECTOR, f'.jp-OutputArea-output[data-mime-type="{STDERR}"]')
        if first:
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", first[0])
    result["screenshot"] = str(_shot(driver, step.name))  # the end of the notebook, or its first error
    if step.name == EXPLORER_STEP:
        result["explorer"] = _explorer(driver, step.name)
    session = _session(lab, name)
    if session:  # free the kernel's memory and CPU for the next notebook
        lab.api(f"/api/sessions/{session['id']}", method="DELETE")
    _RESULTS[step.name] = result
    return result


@pytest.mark.parametrize("step", pl.STEPS, ids=[s.name for s in pl.STEPS])
def test_notebook_runs_in_jupyterlab_without_errors(step, driver, lab):
    result = _run_in_lab(driver, lab, step)
    assert not result["page_errors"], (
        f"{step.name}: an output shows a traceback in JupyterLab (screenshot {result['screenshot']}):\n"
        + "\n---\n".join(result["page_errors"])
    )
    assert not result["saved_errors"], f"{step.name}: error outputs in the saved notebook: {result['saved_errors']}"
    assert not result["not_run"], f"{step.name}: code cells {result['not_run']} never ran (the run stopped early)"
    summary = screenshot_dir() / "timings.json"
    timings = json.loads(summary.read_text()) if summary.is_file() else {}
    timings[step.name] = result["seconds"]
    summary.write_text(json.dumps(timings, indent=2) + "\n")


def test_head_explorer_widget_renders_and_responds(driver, lab):
    step = next(s for s in pl.STEPS if s.name == EXPLORER_STEP)
    seen = _run_in_lab(driver, lab, step).get("explorer", {})
    assert "error" not in seen, f"head explorer: {seen.get('error')} (screenshot {seen.get('screenshot_error')})"
    assert seen["sliders"] == ["head", "layer", "token"], seen
    assert seen["dropdown"], "the sample picker (a dropdown) is missing"
    assert seen["play"], "the token stepper's play button is missing"
    before, after = seen["head"]
    assert abs(after - before) == 1, seen
    assert seen["figure_changed"], f"moving the head slider from {before} to {after} did not redraw the figure"
    assert Path(seen["screenshot_before"]).is_file() and Path(seen["screenshot_after"]).is_file()
