"""Fixtures of the browser test: the tiny run, a JupyterLab server on loopback, Debian's Chromium.

Environment (the Makefile's ``test`` and ``test-browser`` targets set the first two):

- ``SPARSEMM_CHROMIUM`` / ``SPARSEMM_CHROMEDRIVER``: the system browser and its driver
  (default ``/usr/bin/chromium``, ``/usr/bin/chromedriver``; ``make setup-browser`` installs them
  with apt). Nothing downloads a browser or a driver of its own: selenium gets both paths, so its
  Selenium Manager never runs, and ``SE_OFFLINE=true`` forbids it network access anyway.
- ``SPARSEMM_REQUIRE_BROWSER=1``: a missing selenium or browser fails the test instead of
  skipping it (``make test`` sets it: in CI the browser test must run).
- ``SPARSEMM_BROWSER_RUN``: the run the notebooks read (e.g. ``runs/tiny``, the folder of
  ``make reproduce``). Unset: the session's own chain run (``tiny_chain`` in tests/conftest.py,
  shared with the chain test). Set: the pipeline brings that run up to date first (steps whose
  parameters and inputs are unchanged are skipped). Either way the notebooks run in the browser
  on a copy of it.
- ``SPARSEMM_BROWSER_CONFIG``: the pipeline config (default ``configs/tiny.yaml``).
- ``SPARSEMM_BROWSER_TO``: bring the run up to this step only (default: the last registered
  step); for working on one notebook with ``-k``.
- ``SPARSEMM_BROWSER_REUSE=1``: use the run as it is, without the pipeline (every step must have
  run successfully in it); saves the chain's minutes after a library edit that changed no result.
- ``SPARSEMM_SCREENSHOT_DIR``: where screenshots go (default ``runs/browser_screenshots``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparsemm_utils import pipeline as pl
from sparsemm_utils.runs import repo_root, resolve_run_dir

REQUIRE = os.environ.get("SPARSEMM_REQUIRE_BROWSER", "") not in ("", "0")
CHROMIUM = Path(os.environ.get("SPARSEMM_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SPARSEMM_CHROMEDRIVER", "/usr/bin/chromedriver"))
# The flags of a quiet, offline, throw-away headless browser.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1500,1100",
)
# JupyterLab user settings for the test: no news or update checks (they would reach the network
# and pop up a notification), and every cell attached to the page so the checks see all outputs.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: runs the notebooks in JupyterLab in a headless Chromium (slow)")


def _unavailable(reason: str):
    if REQUIRE:
        pytest.fail(f"the browser test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_run(request, tmp_path_factory):
    """(config, run copy): by default the session's chain run (tests/conftest.py: tiny_chain, one
    chain run per `make test`); with SPARSEMM_BROWSER_RUN a run folder brought up to date by the
    pipeline. Copied so the notebooks run in the browser write into the copy, not the run."""
    if not os.environ.get("SPARSEMM_BROWSER_RUN"):
        run, config, _ = request.getfixturevalue("tiny_chain")
        copy = tmp_path_factory.mktemp("browser") / "run"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.html", "index.html"))
        return config, copy
    config = pl.load_config(os.environ.get("SPARSEMM_BROWSER_CONFIG") or repo_root() / "configs" / "tiny.yaml")
    run = resolve_run_dir(os.environ["SPARSEMM_BROWSER_RUN"])
    last = os.environ.get("SPARSEMM_BROWSER_TO") or pl.STEPS[-1].name
    if os.environ.get("SPARSEMM_BROWSER_REUSE", "") not in ("", "0"):
        from sparsemm_utils.manifest import Manifest

        for step in pl.select_steps(None, last):
            manifest = Manifest.read(run / step.name)
            if manifest is None or manifest.status != "ok":
                pytest.fail(f"SPARSEMM_BROWSER_REUSE: step {step.name} has not run successfully in {run}", pytrace=False)
    else:
        pl.run_pipeline(config, run, to_step=last, log=lambda line: print(line, flush=True))
    copy = tmp_path_factory.mktemp("browser") / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.html", "index.html"))
    return config, copy


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Lab:
    """A running JupyterLab: its base URL, token, notebook folder and log file."""

    url: str
    token: str
    root: Path
    log: Path
    process: subprocess.Popen

    def api(self, path: str, method: str = "GET") -> object:
        request = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


@pytest.fixture(scope="session")
def lab(tiny_run, tmp_path_factory):
    """JupyterLab on 127.0.0.1 (a free port, a random token) serving parametrized copies of the
    chain's notebooks: each gets papermill's injected-parameters cell with exactly the parameters
    the pipeline gives it (configs/tiny.yaml), its run_dir the run copy. Always shut down."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    config, run = tiny_run
    base = tmp_path_factory.mktemp("lab")
    root = base / "notebooks"
    root.mkdir()
    for step in pl.STEPS:
        source = step.notebook_path()
        params = pl.step_parameters(step, config, run, pl.declared_parameters(source))
        nb = parameterize_notebook(load_notebook_node(str(source)), params, report_mode=False)
        nbformat.write(nb, str(root / source.name))
    home = base / "home"
    settings = home / "lab-settings"
    for relative, values in LAB_SETTINGS.items():
        path = settings / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "IPYTHONDIR": str(home / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    port, token = _free_port(), secrets.token_hex(16)
    log = base / "jupyterlab.log"
    command = [
        str(Path(sys.executable).parent / "jupyter-lab"),
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        # offline: no extension manager reaching PyPI, no update check, no news feed
        "--LabApp.extension_manager=readonly",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI runs as root on a throw-away machine
        command.append("--allow-root")
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    server = Lab(f"http://127.0.0.1:{port}", token, root, log, process)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"jupyter lab exited with {process.returncode}:\n{server.log_tail()}", pytrace=False)
            try:
                server.api("/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer within 120 s:\n{server.log_tail()}", pytrace=False)
                time.sleep(0.5)
        yield server
    finally:
        try:
            server.api("/api/shutdown", method="POST")
            process.wait(timeout=30)
        except Exception:  # already gone, or hung: terminate it below
            pass
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    """Debian's Chromium through Debian's chromedriver, headless, with a fresh profile."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (it is pinned in requirements-dev.txt: run `make setup-dev`)")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (path.is_file() and os.access(path, os.X_OK)):
            _unavailable(f"{path} is missing: run `make setup-browser` (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile.parent / "chromedriver.log"))
    browser = webdriver.Chrome(options=options, service=service)
    browser.set_page_load_timeout(120)
    try:
        yield browser
    finally:
        browser.quit()
