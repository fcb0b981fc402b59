"""The run report in a real headless browser (Debian's chromium, driven by selenium): it renders with no console
error, its plots load, the trajectory viewer steps through a trajectory, and a screenshot is taken."""

from __future__ import annotations

import shutil

import pytest

from spa_rl.pipeline.run import make_run_config, run_pipeline

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "run"
    run_pipeline(make_run_config({("recipe",): "spa", ("preset",): "smoke", ("out",): str(root),
                                  ("tensorboard",): False}), quiet=True)
    return root


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_report_works_in_a_browser(run_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import Select

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((run_dir / "report.html").as_uri())
        assert driver.title.startswith("spa run spa")
        images = driver.find_elements("css selector", "img")
        assert images and all(driver.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)
        puzzle = Select(driver.find_element("id", "puzzle"))
        assert len(puzzle.options) == 2, "the smoke preset evaluates 2 validation puzzles"
        position = driver.find_element("id", "pos")
        assert position.text.startswith("turn 1 of")
        turns = int(position.text.split(" of ")[1])
        grids = driver.find_elements("css selector", "#turn table.grid")
        assert len(grids) >= 3, "the shown and true states at least"
        if turns > 1:
            driver.find_element("id", "next").click()
            assert position.text.startswith("turn 2 of")
            driver.find_element("id", "prev").click()
            assert position.text.startswith("turn 1 of")
        puzzle.select_by_index(1)
        assert position.text.startswith("turn 1 of")
        shot = run_dir / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
