"""The web console at `/`, in a real headless browser (Debian's chromium through
chromium-driver and selenium): every page loads without errors in the browser's console and
shows what the Kafka state holds; pause and resume work through the buttons; screenshots of
every page are written to $WEIR_SCREENSHOT_DIR (default: the test's directory)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import requests
from confluent_kafka import Producer
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By

from support import committed_offsets, create_topic, wait_until
from test_metrics import COPY_PIPELINE, consume_and_commit, produce
from test_pipelines import pipeline_state, pipelines_daemon


@pytest.fixture
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, \
        "chromium and chromedriver are not installed: run tests/run, which installs them"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1366,900", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    b = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield b
    finally:
        b.quit()


def click(browser, by: str, value: str) -> None:
    """Clicks an element; the page is redrawn every two seconds, so a click that lands on a
    replaced element is tried again on the new one."""
    def attempt() -> bool:
        try:
            browser.find_element(by, value).click()
            return True
        except StaleElementReferenceException:
            return False
    wait_until(attempt, 10, message=f"to click {value}")


def no_console_errors(browser) -> None:
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def text(browser) -> str:
    return browser.find_element(By.ID, "page").text


def test_every_page_shows_the_state_and_the_buttons_work(weir_factory, tmp_path, browser):
    weir, d = pipelines_daemon(weir_factory, tmp_path, **{"copy.yaml": COPY_PIPELINE})
    create_topic(weir.bootstrap, "orders", 2)
    produce(weir.bootstrap, "orders", 200, 2)
    consume_and_commit(weir.bootstrap, "orders", "billing", 200)
    p = Producer({"bootstrap.servers": weir.bootstrap})
    p.produce("orders", key=b"u1", value=json.dumps({"user": "u1", "total": 12.5}).encode(),
              headers=[("source", b"checkout")], partition=0)
    assert p.flush(30) == 0
    produce(weir.bootstrap, "pin", 25, 1)
    wait_until(lambda: (pipeline_state(weir, "copy") or {}).get("records_in") == 25, 30,
               message="the pipeline to copy")
    shots = Path(os.environ.get("WEIR_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    base = weir.http_url

    def page(path: str, expect: list[str], shot: str) -> str:
        browser.get(f"{base}/{path}")
        wait_until(lambda: all(s in text(browser) for s in expect), 30,
                   message=f"{path} to show {expect} (it shows: {text(browser)[:300]!r})")
        browser.save_screenshot(str(shots / f"console-{shot}.png"))
        no_console_errors(browser)
        return text(browser)

    def drawn(selector: str) -> bool:
        """A uPlot chart (it draws on a canvas inside its .uplot box) in `selector`."""
        return bool(browser.find_elements(By.CSS_SELECTOR, f"{selector} .uplot canvas"))

    def points(selector: str) -> int:
        """How many samples the chart in `selector` was last drawn with."""
        found = browser.find_elements(By.CSS_SELECTOR, selector)
        return int(found[0].get_attribute("data-points")) if found else 0

    page("#/overview", ["Overview", "topics", "pipelines running", "1 / 1"], "overview")
    wait_until(lambda: drawn(".chart"), 10, message="the chart of records produced")
    # A rate needs two readings; the chart grows by one sample at each refresh.
    create_topic(weir.bootstrap, "ticks", 1)
    produce(weir.bootstrap, "ticks", 20, 1)
    wait_until(lambda: points(".chart[data-series='produced']") >= 3, 20,
               message="the chart of records produced to gather samples")
    browser.save_screenshot(str(shots / "console-overview.png"))
    page("#/topics", ["orders", "pin", "pout"], "topics")
    # The partitions, and the record browser with the JSON value pretty-printed.
    shown = page("#/topics/orders", ["Topic orders", '"user": "u1"', "source: checkout"], "topic")
    assert "12.5" in shown
    page("#/groups", ["billing", "Empty"], "groups")
    page("#/groups/billing", ["Lag over time", "Offsets and lag", "orders", "Reset offsets"], "group")
    wait_until(lambda: drawn(".chart"), 10, message="the chart of the group's lag")
    # The group is empty: its offsets go back to the beginning through the reset button.
    click(browser, By.ID, "reset-offsets")
    wait_until(lambda: committed_offsets(weir.bootstrap, "billing", "orders", range(2)) == {0: 0, 1: 0}, 30,
               message="billing's offsets to be reset")
    wait_until(lambda: "201" in text(browser), 30, message="the lag of the whole topic")
    no_console_errors(browser)
    page("#/pipelines", ["copy", "running", "topic pin", "topic pmid", "topic pout", "source lag"],
         "pipelines")
    wait_until(lambda: drawn("tr[data-pipeline='copy'] .sparkline"), 10,
               message="the pipeline's rate sparkline")

    page("#/plugins", ["Plugins", "modules compiled", "none"], "plugins")

    # A refused file shows its YAML with the error's line marked.
    (d / "bad.yaml").write_text("name: bad\nsource:\n  topic:\n    name: pin\ntopic:\n"
                                "  name: pbad\nbatch_records: many\n")
    page("#/pipelines", ["bad.yaml", "the refused YAML (line 7, column 16)"], "pipelines-refused")
    marked = browser.find_element(By.CSS_SELECTOR, ".yaml-line.bad").text
    assert marked.strip() == "7  batch_records: many", marked
    (d / "bad.yaml").unlink()

    # Pause and resume through the buttons.
    browser.get(f"{base}/#/pipelines")
    click(browser, By.XPATH, "//tr[@data-pipeline='copy']//button[text()='Pause']")
    wait_until(lambda: pipeline_state(weir, "copy")["state"] == "paused", 30,
               message="the pipeline to pause")
    wait_until(lambda: "Resume" in text(browser), 30, message="the Resume button")
    browser.save_screenshot(str(shots / "console-pipelines-paused.png"))
    click(browser, By.XPATH, "//tr[@data-pipeline='copy']//button[text()='Resume']")
    wait_until(lambda: pipeline_state(weir, "copy")["state"] == "running", 30,
               message="the pipeline to resume")
    no_console_errors(browser)


def test_the_console_is_served_from_the_binary(weir):
    for path, kind in (("/", "text/html"), ("/console/console.js", "text/javascript"),
                       ("/console/console.css", "text/css"),
                       ("/console/uPlot.iife.min.js", "text/javascript"),
                       ("/console/uPlot.min.css", "text/css")):
        r = requests.get(f"{weir.http_url}{path}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), (path, r.headers)
    assert requests.get(f"{weir.http_url}/console/nope.js", timeout=10).status_code == 404
