"""MLflow's UI in a real browser, as a new user opens it from the link tlkit prints.

A 2-variant suite on a tiny image folder logs to a real `mlflow server` (SQLite store) on 127.0.0.1;
headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium) opens the printed
link from a fresh profile. What decides the landing page and the default columns is MLflow's own
UI code (tlkit/tracking.py, above UI_VIEW). TLKIT_SCREENSHOT_DIR=docs/images saves the screenshots
the README and the docs show (else they go to the test's tmp folder).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import FAST_ARGS, clean_env, free_port, start_mlflow_server, stop

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Chromium as root in a container: no sandbox; nothing fetched from the network on start.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1500,760"]
VARIANTS = ("baseline", "dropout")
WAIT_S = 60


def test_ui_link_of_a_local_store_says_how_to_serve_it():
    from tlkit.tracking import ui_link

    assert ui_link("7", "sqlite:///mlflow.db") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=tlkit-runs"
        " (after `mlflow ui --backend-store-uri sqlite:///mlflow.db`)")
    assert ui_link("7", "http://host:5000/").startswith("http://host:5000/#/experiments/7/runs?")


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Debian's chromium and chromium-driver are needed (bash .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # A profile of its own, empty: no remembered "Model training" toggle, no chosen columns.
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tmp_path, empty_store):
    import shutil

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    port = free_port()
    process = start_mlflow_server(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts", port,
                                  tmp_path / "server.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.mark.e2e
def test_the_printed_link_opens_the_runs_with_test_accuracy_and_the_champion(server, browser, image_folder,
                                                                            tmp_path):
    import mlflow
    from selenium.webdriver.support import expected_conditions as shown

    command = [sys.executable, "-m", "tlkit.cli", "suite", "--variants", ",".join(VARIANTS), "--data",
               str(image_folder), "--experiment", "ui", "--model-name", "shapes-ui", *FAST_ARGS]
    env = clean_env(MLFLOW_TRACKING_URI=server, TLKIT_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(server)
    experiment = client.get_experiment_by_name("ui").experiment_id
    # The last line about the UI is the suite's (each child is nested: it prints none).
    links = re.findall(r"runs in MLflow's UI: (\S+)", done.stderr)
    assert links[-1] == (f"{server}/#/experiments/{experiment}/runs?workflowType=machine_learning"
                         "&viewStateShareKey=tlkit-runs"), done.stderr[-2000:]
    children = client.search_runs([experiment], "tags.mlflow.parentRunId != ''")
    assert sorted(r.info.run_name for r in children) == sorted(VARIANTS)

    browser.get(links[-1])
    for run in children:
        # The runs table comes in parts (pinned names, scrolled columns), a row of each per run.
        metric = f'[role=row][row-id="{run.info.run_id}"] [col-id="metrics.`test_accuracy`"]'
        name = f'[role=row][row-id="{run.info.run_id}"] [col-id="attributes.`Run Name`"]'
        _wait(browser, shown.presence_of_element_located(("css selector", metric)),
              f"{run.info.run_name}'s test_accuracy")
        # The run's name (after the colour swatch's label) and its logged test_accuracy, shown
        # without the user adding the column (cut short on screen to the column's width).
        assert _text(browser, name).endswith(run.info.run_name)
        assert float(_text(browser, metric)) == pytest.approx(run.data.metrics["test_accuracy"])
    # The training runs, not the GenAI overview it would redirect to (#/experiments/<id>/overview).
    assert f"/experiments/{experiment}/runs" in browser.current_url, browser.current_url
    assert "Detect Issues" not in browser.find_element("tag name", "body").text
    shots = Path(os.environ.get("TLKIT_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    _close_assistant(browser)  # MLflow opens its chat panel on a first visit; it hides a third of the page
    browser.save_screenshot(str(shots / "mlflow-ui-runs.png"))

    champion = client.get_model_version_by_alias("shapes-ui", "champion").version
    browser.get(f"{server}/#/models/shapes-ui")
    version_row = f'//*[@role="row"][.//a[normalize-space()="Version {champion}"]]'
    _wait(browser, shown.presence_of_element_located(("xpath", version_row)), f"version {champion}")
    _wait(browser, lambda b: "champion" in b.find_element("xpath", version_row).text, "the champion alias")
    _close_assistant(browser)
    browser.save_screenshot(str(shots / "mlflow-ui-champion.png"))


def _wait(browser, condition, what: str):
    """condition's answer once it has one; else fail saying what the browser shows."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, WAIT_S).until(condition)
    except TimeoutException:
        body = browser.find_element("tag name", "body").text
        raise AssertionError(f"{what} not shown in {WAIT_S} s at {browser.current_url}; the page says:\n{body[:2000]}")


def _text(browser, selector: str) -> str:
    return browser.find_element("css selector", selector).get_attribute("textContent").strip()


def _close_assistant(browser) -> None:
    for button in browser.find_elements("css selector", '[data-component-id="mlflow.assistant.chat_panel.close"]'):
        if button.is_displayed():
            button.click()
