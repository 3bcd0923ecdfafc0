"""`crh web` in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium, against `crh web` running as a real
process on the test cluster (tests/web_world.py).

* the overview names the jobs and changes, without a reload, when a job
  finishes while the page is open (a real worker finishes it);
* a finished inversion's page shows a model picture whose pixels are not
  blank, and an RMS chart;
* a failed job's page shows its reason, exe/error.dat and the log's tail;
* alice's browser never shows bob's job ids, on any page she can reach;
* a CRMod job shows its readings; a sipdir its frequencies side by side.

Screenshots of every page are kept: in the directory named by
``CRH_WEB_SCREENSHOTS`` if set, else in pytest's temporary directory
(``.../web-screenshots0/``, printed at the end of the module's first test).

Chromium runs with ``--headless --no-sandbox --disable-gpu
--disable-background-networking --disable-component-update --disable-sync
--no-first-run`` and a fresh ``--user-data-dir``; Selenium is given the
system's browser and driver, so it never looks for or downloads one.
Where Chromium is not installed the tests skip, saying so, except under CI
(``CI`` set): .ci/run installs it, so there a missing browser fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cr_queue.tomodir import synth

from .conftest import run, script
from .web_world import ALICE, NODE, world  # noqa: F401  (fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 120.0


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    chosen = os.environ.get("CRH_WEB_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("web-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        message = f"{' and '.join(missing)} not installed: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (.ci/run installs them; under CI the browser tests must run)")
        pytest.skip(message)
    selenium = pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[test]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    del selenium
    home = tmp_path_factory.mktemp("chromium-home")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={home / 'profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    env = {**os.environ, "HOME": str(home), "SE_OFFLINE": "true", "SE_CACHE_PATH": str(home / "selenium")}
    service = Service(executable_path=CHROMEDRIVER, env=env, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_until(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except Exception as exc:  # TimeoutException, with what was awaited
        raise AssertionError(f"waited {timeout:.0f} s for {what}; the page says:\n{driver.find_element('tag name', 'body').text[:2000]}") from exc


def shoot(driver, shots: Path, name: str) -> Path:
    """The whole page as a PNG (the window grown to the page's height)."""
    height = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    driver.set_window_size(1400, min(max(int(height) + 120, 800), 8000))
    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return path


def job_ids_shown(driver) -> set[int]:
    """Every job the page shows: each reference carries data-job-id (links, rows, figures)."""
    values = driver.execute_script("return Array.from(document.querySelectorAll('[data-job-id]')).map(e => e.dataset.jobId)")
    return {int(v) for v in values}


PIXELS = """
const img = arguments[0];
if (!img.complete || img.naturalWidth === 0) { return null; }
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const ctx = canvas.getContext('2d');
ctx.drawImage(img, 0, 0);
const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
const colours = new Set();
let inked = 0;
for (let i = 0; i < data.length; i += 4 * 7) {
  const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
  if (a > 0 && (r < 235 || g < 235 || b < 235)) { inked++; }
  colours.add((r << 16) | (g << 8) | b);
}
return {width: img.naturalWidth, height: img.naturalHeight, colours: colours.size, inked: inked, samples: data.length / 28};
"""


def picture(driver, element_id: str) -> dict:
    """An <img> as the browser drew it: its size, how many colours, how much of it is not blank."""
    element = driver.find_element("id", element_id)
    return wait_until(driver, lambda d: d.execute_script(PIXELS, element), f"the picture #{element_id} to load", 60)


def test_the_overview_names_the_jobs_and_changes_when_one_finishes(world, browser, shots):
    """The page stays open (no reload: a marker set in the page survives) while a real
    worker finishes the jobs; the latest-jobs table turns queued into finished by itself."""
    if world.worker_ran:  # run out of order: a job of its own to watch
        late = world.home / "alice-late"
        synth.make_tomodir(late / "late", "inv", seed=11)
        (added,) = world.add(ALICE, late)
        good = added["job_id"]

        def finish() -> None:
            run([script("crh_worker"), "-q"], world.env_as(NODE), timeout=600)
    else:
        good, finish = world.alice["good"], world.run_worker
    web = world.web(ALICE)
    browser.get(web.url)
    row = f"tr[data-row-job='{good}']"
    assert browser.find_element("css selector", f"{row} .state").text == "queued"
    assert set(world.alice.values()) <= job_ids_shown(browser)
    shoot(browser, shots, "overview-before")
    browser.execute_script("window.crhMarker = 'still the same page';")
    finish()
    wait_until(
        browser,
        lambda d: d.find_element("css selector", f"{row} .state").text == "finished",
        f"job {good} to show as finished on the open overview",
    )
    assert browser.execute_script("return window.crhMarker") == "still the same page", "the page was reloaded"
    wait_until(browser, lambda d: d.find_element("css selector", "[data-total='failed']").text == "1", "one failed job counted")
    assert "no failed job waits" not in browser.find_element("tag name", "body").text
    shoot(browser, shots, "overview-after")
    print(f"screenshots in {shots}")


def _alices_finished_job(world, browser, name: str):
    """Runs the worker (once), then opens the page of Alice's job `name`; the web server."""
    world.run_worker()
    web = world.web(ALICE)
    browser.get(f"{web.url}jobs/{world.alice[name]}")
    return web


def test_a_finished_inversion_shows_its_model_and_rms(world, browser, shots):
    _alices_finished_job(world, browser, "good")
    model = picture(browser, "model-picture")
    assert model["width"] > 400 and model["height"] > 200
    assert model["colours"] > 50 and model["inked"] > 0.2 * model["samples"], model
    rms = picture(browser, "rms-chart")
    assert rms["width"] > 300 and rms["colours"] > 10 and rms["inked"] > 0.02 * rms["samples"], rms
    table = browser.find_element("id", "convergence").text
    assert "final data RMS" in table and "IT 3" in table
    shoot(browser, shots, "job-finished-inversion")


def test_a_failed_job_shows_its_reason_and_log(world, browser, shots):
    _alices_finished_job(world, browser, "bad")
    failure = browser.find_element("id", "failure").text
    assert "error_dat" in failure and "wrote exe/error.dat" in failure
    assert "failure injected by the cr_queue stand-in" in browser.find_element("id", "error-dat").text
    log_tail = browser.find_element("id", "log-tail").text
    assert "CRTomo stand-in" in log_tail and "Reading Input-Files" in log_tail
    shoot(browser, shots, "job-failed")


def test_a_crmod_job_and_a_sipdir(world, browser, shots):
    web = _alices_finished_job(world, browser, "model")
    volt = picture(browser, "volt-plot")
    assert volt["colours"] > 10 and volt["inked"] > 0
    shoot(browser, shots, "job-crmod")
    browser.get(f"{web.url}jobs/{world.alice['01_1.000000']}")
    browser.find_element("css selector", "#fields a.sipdir").click()
    wait_until(browser, lambda d: d.find_elements("css selector", "figure.frequency"), "the sipdir page")
    figures = browser.find_elements("css selector", "figure.frequency")
    assert [f.get_attribute("data-frequency") for f in figures] == ["0.1", "1.0", "10.0"]
    tops = {f.location["y"] for f in figures}
    assert len(tops) == 1, "the frequencies are side by side"
    for figure in figures:
        image = figure.find_element("css selector", "img")
        drawn = wait_until(browser, lambda d: d.execute_script(PIXELS, image), "a frequency's model")
        assert drawn["colours"] > 20
    together = picture(browser, "frequencies-picture")
    assert together["width"] > together["height"] and together["colours"] > 50, together
    shoot(browser, shots, "sipdir")


def test_alice_never_sees_bobs_jobs(world, browser, shots):
    world.run_worker()
    web = world.web(ALICE)
    bob = set(world.bob.values())
    seen: set[int] = set()
    browser.get(web.url)
    seen |= job_ids_shown(browser)
    links = [a.get_attribute("href") for a in browser.find_elements("css selector", "a")]
    for href in sorted({h for h in links if h and h.startswith(web.url)}):
        browser.get(href)
        seen |= job_ids_shown(browser)
        assert not re.search(rf"\bjob {'|'.join(map(str, bob))}\b", browser.title)
    browser.get(f"{web.url}jobs?path=secret")
    seen |= job_ids_shown(browser)
    assert "no job matches" in browser.find_element("id", "job-list").text
    browser.get(f"{web.url}jobs/{world.bob['secret']}")
    assert "404" in browser.find_element("tag name", "h1").text
    assert "may see" in browser.find_element("tag name", "body").text
    shoot(browser, shots, "bob-job-as-alice")
    assert set(world.alice.values()) <= seen and not (seen & bob), f"alice saw {sorted(seen & bob)}"
    browser.get(f"{web.url}jobs")
    shoot(browser, shots, "jobs-as-alice")
    # The owner's browser does show bob's job: the check above could have seen it.
    owner = world.web(None)
    browser.get(f"{owner.url}jobs")
    assert bob <= job_ids_shown(browser)
    shoot(browser, shots, "jobs-as-owner")


def test_the_screenshots_are_kept(world, browser, shots):
    """Every page above left its screenshot (a non-empty PNG)."""
    taken = sorted(p.name for p in shots.glob("*.png"))
    expected = {"job-finished-inversion.png", "job-failed.png", "job-crmod.png", "sipdir.png", "bob-job-as-alice.png", "jobs-as-alice.png"}
    assert expected <= set(taken), taken
    for path in shots.glob("*.png"):
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5000, path
