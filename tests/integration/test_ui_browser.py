"""``make test-ui``: the MLflow UI in headless Chromium, comparing two runs of different configurations.

Starts ``make ui``'s launcher on a loopback port against a store with two tiny probed runs, a MEL one (MLL × MRL ×
MEL ranks 16, 8) and a baseline that trains only the full cell and truncates afterwards (the paper suite's baseline:
MLL and MRL weight 0, MEL posthoc), opens the URL it prints (the runs table in the saved headline view), one run's
page, the compare page of both and one per-cell chart, and asserts from the rendered DOM that the runs table shows
the headline columns without a click, the compare page shows a cell metric with both runs' values and the same-named
final heatmap of both side by side, and the cell's chart plots both runs. Screenshots go to the test's output folder
(``runs.png``, ``run.png``, ``compare.png``, ``compare_heatmaps.png``, ``cell_chart.png``).

Needs Chromium and its driver (``apt-get install chromium chromium-driver``) and ``selenium`` (``.[browser]``).
To shoot another store, e.g. the docs' quickstart runs: ``UI_STORE=sqlite:////tmp/ui/mlflow.db
UI_EXPERIMENT=quickstart UI_SCREENSHOTS=docs/img python -m pytest -m browser tests/integration/test_ui_browser.py``.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import mlflow
import pytest

from experiments.config import compose
from experiments.run import train
from experiments.run_metadata import PROJECT_ROOT
from tests.conftest import run_overrides
from tests.integration.test_tracking import free_port
from tests.integration.test_tracking_server import stop, wait_until_up

pytestmark = pytest.mark.browser

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
EXPERIMENT = "ui-browser"
TINY = ["trainer.max_steps=2", "data.locales=[de]", "plugins.mll.layers=[2,4]", "plugins.mrl.dims=[32,16]",
        "probe.enabled=true", "probe.at_start=false", "probe.every_n_steps=0", "probe.locales=[de,kk]",
        "probe.max_pairs_per_locale=8", "probe.batch_size=16", f"tracking.experiment={EXPERIMENT}"]
# Two configurations: MEL trained (every cell names its rank), and the baseline truncated afterwards (its full cells
# named without a rank, its rank cells as MEL's).
SETUPS = {"mel": [], "baseline": ["plugins.mll.weights=[0.0,1.0]", "plugins.mrl.weights=[1.0,0.0]",
                                  "plugins.mel.posthoc=true"]}
HEADLINE = ("final/mean_main_score/full", "final/GettextRetrieval/full")  # columns the 1600-px table renders
CELL_METRIC = re.compile(r"Gettext\w+/layer_\d+/dim_\d+/rank_\d+")  # a task's main score at a cut-rank cell
WAIT_S = 90


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus_dir):
    """``(uri, experiment)``: the two tiny probed runs in a fresh store, or the store named by ``$UI_STORE``."""
    if os.environ.get("UI_STORE"):
        return os.environ["UI_STORE"], os.environ.get("UI_EXPERIMENT", EXPERIMENT)
    root = tmp_path_factory.mktemp("ui-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # a tiny run is over before the default 10 s
        for name, overrides in SETUPS.items():
            train(compose("tiny", [*run_overrides(root / name, corpus_dir, root), *TINY, *overrides,
                                   f"tracking.run_name={name}"]))
    return f"sqlite:///{root}/mlflow.db", EXPERIMENT


@pytest.fixture(scope="module")
def ui(store):
    """``(runs page URL, base URL)`` of ``make ui``'s launcher serving the store."""
    uri, experiment = store
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "experiments.mlflow_ui", "--port", str(port), "--uri", uri,
                               "--experiment", experiment, "--no-browser"], cwd=PROJECT_ROOT,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        url = re.match(r"MLflow UI: (\S+)", server.stdout.readline()).group(1)
        wait_until_up(port, server)
        yield url, f"http://127.0.0.1:{port}"
    finally:
        stop(server)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and DRIVER.exists()):
        pytest.skip("no Chromium: apt-get install -y chromium chromium-driver (make test-ui does)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(options=options, service=Service(str(DRIVER)))  # the system's driver: no download
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """The folder for screenshots; copied to ``$UI_SCREENSHOTS`` at the end when set."""
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    if os.environ.get("UI_SCREENSHOTS"):
        for shot in folder.glob("*.png"):
            shutil.copy(shot, Path(os.environ["UI_SCREENSHOTS"]) / f"mlflow_{shot.name}")


def page_text(driver) -> str:
    return driver.find_element("tag name", "body").text


def wait_for(driver, texts, timeout: float = WAIT_S) -> str:
    """The page's text once it shows every one of ``texts`` (the UI renders in the browser, after its API calls)."""
    deadline = time.monotonic() + timeout
    while True:
        text = page_text(driver)
        missing = [wanted for wanted in texts if wanted not in text]
        if not missing:
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"{driver.current_url} does not show {missing} after {timeout} s; it shows: {text[:2000]}")
        time.sleep(1)


def close_assistant(driver) -> None:
    """MLflow 3.17 opens its assistant panel over a third of the page on the first visit: close it."""
    for button in driver.find_elements("css selector", "[data-assistant-ui] button[aria-label='Close']"):
        button.click()


def runs_of(uri: str, experiment: str):
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    return client, found.experiment_id, [run for run in runs if not run.info.run_name.startswith("compare ")][-2:]


def test_runs_table_compare_page_and_cell_chart_compare_two_configurations(store, ui, browser, shots):
    runs_url, base = ui
    client, experiment_id, (first, second) = runs_of(*store)
    names = [first.info.run_name, second.info.run_name]
    assert runs_url.startswith(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    assert "viewStateShareKey=" in runs_url  # the saved headline view

    browser.get(runs_url)  # what make ui opens: the runs table of the model-training view, headline columns shown
    wait_for(browser, [*names, *HEADLINE])
    close_assistant(browser)
    browser.save_screenshot(str(shots / "runs.png"))

    run_url = f"{base}/#/experiments/{experiment_id}/runs/{second.info.run_id}?workflowType=machine_learning"
    browser.get(run_url)
    description = second.data.tags.get("mlflow.note.content", "").splitlines()[0]
    wait_for(browser, [names[1], description])
    close_assistant(browser)
    browser.save_screenshot(str(shots / "run.png"))

    query = urllib.parse.urlencode({"runs": json.dumps([first.info.run_id, second.info.run_id]),
                                    "experiments": json.dumps([experiment_id])})
    browser.get(f"{base}/#/compare-runs?{query}&workflowType=machine_learning")
    heatmaps = [{artifact.path for artifact in client.list_artifacts(run.info.run_id)
                 if re.fullmatch(r"probe_final_.+\.png", artifact.path)} for run in (first, second)]
    shared = sorted(heatmaps[0] & heatmaps[1])
    assert "probe_final_GettextRetrieval_rank_16.png" in shared  # one name per model-side setting, in both runs
    heatmap = shared[0]
    # the compare table lists metrics alphabetically and renders the first rows: the first cell both runs probed
    shared_cell = sorted(key for key in first.data.metrics
                         if CELL_METRIC.fullmatch(key) and key in second.data.metrics)[0]
    wait_for(browser, [*names, "Parallel Coordinates Plot", "probe_final.csv", heatmap, shared_cell])
    close_assistant(browser)
    browser.save_screenshot(str(shots / "compare.png"))
    entry = browser.find_elements("xpath", f"//div[normalize-space()='{heatmap}']")[0]  # the file list
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'}); arguments[0].click();", entry)
    deadline = time.monotonic() + WAIT_S
    while len(shown := {image.get_attribute("src") for image in browser.find_elements("css selector", "img[src^=blob]")
                        if image.is_displayed()}) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(shown) == 2, f"{heatmap}: {len(shown)} of the two runs' heatmaps shown side by side"
    browser.set_window_size(2400, 1000)  # the previews share the page's width: give each heatmap room
    image = next(image for image in browser.find_elements("css selector", "img[src^=blob]") if image.is_displayed())
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", image)
    time.sleep(1)
    browser.save_screenshot(str(shots / "compare_heatmaps.png"))
    browser.set_window_size(1600, 1000)

    # the cell's chart (the compare table's link to a metric): both runs under one name, with their values
    chart = urllib.parse.urlencode({"runs": json.dumps([first.info.run_id, second.info.run_id]),
                                    "metric": json.dumps(shared_cell), "experiments": json.dumps([experiment_id]),
                                    "plot_metric_keys": json.dumps([shared_cell])})
    browser.get(f"{base}/#/metric?{chart}&workflowType=machine_learning")
    text = wait_for(browser, [shared_cell, *[f"{name} " for name in names], "(step="])
    for run in (first, second):
        shown = re.search(rf"^{re.escape(run.info.run_name)} (\S+) \(step=", text, re.MULTILINE)
        assert shown and float(shown.group(1)) == pytest.approx(run.data.metrics[shared_cell], abs=1e-3), text
    assert browser.find_elements("css selector", ".js-plotly-plot")
    browser.save_screenshot(str(shots / "cell_chart.png"))
    assert all((shots / name).stat().st_size > 10_000 for name in ("runs.png", "run.png", "compare.png",
                                                                  "compare_heatmaps.png", "cell_chart.png"))


MODEL_NAME = "ui-browser-cell"


def test_models_page_lists_the_registered_versions(store, ui, browser, shots):
    """``make pick|export REGISTER=...``: two versions of one model; the Models page lists the model, its page both
    versions with their source run. With ``$UI_STORE`` the store's own registered models are checked instead."""
    uri, _ = store
    client = mlflow.MlflowClient(uri)
    if not os.environ.get("UI_STORE"):
        from experiments.export import register_export
        from experiments.loading import load_run
        from lightning_modules.cell_export import export_cell

        (checkpoint,) = Path(uri.removeprefix("sqlite:///")).parent.glob("mel/outputs/*/*/checkpoints/last.ckpt")
        run = load_run(checkpoint)
        for layer, dim in ((2, 16), (4, 32)):
            result = export_cell(run.model, checkpoint.parent.parent / "export" / f"l{layer}-d{dim}",
                                 run.model.cell(layer=layer, dim=dim), run.origin())
            register_export(run, result, MODEL_NAME)
    models = {model.name: model for model in client.search_registered_models()}
    assert models, "no registered model in the store"
    name = MODEL_NAME if MODEL_NAME in models else sorted(models)[0]
    versions = sorted(int(version.version) for version in client.search_model_versions(f"name='{name}'"))
    _, base = ui
    browser.get(f"{base}/#/models")
    wait_for(browser, [name])  # (a first visit may open MLflow's dialogs over the page: read the text, click nothing)
    browser.save_screenshot(str(shots / "models.png"))
    browser.get(f"{base}/#/models/{urllib.parse.quote(name)}")
    wait_for(browser, [name, *(f"Version {version}" for version in versions)])
    browser.save_screenshot(str(shots / "model_versions.png"))
    assert (shots / "models.png").stat().st_size > 10_000
