"""The dashboard in a real browser (Debian's chromium), against the real daemon and the emulator.

The overview keeps itself current, the slider moves, Retry brings a failed file back, Pause stops
new submits, a hostile file name stays text, and without the token only the login page is shown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.journal import JobState

from .browser import chromium, console_errors, needs_chromium
from .conftest import drop_scan, wait_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]

pytestmark = needs_chromium

TOKEN = "browser-test-token-0123456789abcdef"
HOSTILE = "<img src=x onerror=alert(1)>.jpg"


def text_of(driver, css: str) -> str:
    """The element's text, or "" (also when the overview's refresh replaced it while it was read)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""
    except StaleElementReferenceException:
        return ""


def click(driver, css: str) -> None:
    """Click the element, found afresh if the overview's refresh replaced it between finding and clicking."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _attempt in range(5):
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{css} kept being replaced while it was clicked")


@pytest.fixture
def dashboard(folders, emulator, make_config, run_daemon):
    daemon = run_daemon(make_config(dashboard={"listen": "127.0.0.1:0"}))
    return daemon, daemon.service.dashboard.url


def test_the_overview_shows_jobs_appearing_and_finishing_without_a_reload(folders, emulator, dashboard):
    daemon, url = dashboard
    emulator.latency = 5.0  # longer than the page's refresh interval: a refresh sees them in flight
    with chromium() as driver:
        driver.get(url + "/")
        wait_for(lambda: text_of(driver, '#counts td[data-state="done"]') == "0", 5, what="no job done yet")
        marker = driver.execute_script("window.notReloaded = true; return window.notReloaded;")
        assert marker is True
        for i in range(3):
            drop_scan(folders, f"portrait-{i}.jpg", seed=i, size=(96, 128))
        wait_for(lambda: "portrait-" in text_of(driver, "#in-flight"), 20, what="jobs in flight on the overview")
        wait_for(lambda: text_of(driver, '#counts td[data-state="done"]') == "3", 40,
                 what="three jobs done on the overview")
        assert driver.execute_script("return window.notReloaded === true;"), "the page was reloaded, not refreshed"
        wait_for(lambda: len(driver.find_elements("css selector", "#latest img")) == 6, 10,
                 what="before/after thumbnails of the latest restorations")
        assert console_errors(driver) == []


def test_the_job_page_slider_moves_the_cut_between_scan_and_restoration(folders, emulator, dashboard):
    from selenium.webdriver.common.keys import Keys

    daemon, url = dashboard
    drop_scan(folders, "couple.jpg", size=(320, 400))
    wait_for(lambda: daemon.service.journal.count_in(JobState.DONE) == 1, 30, what="the delivery")
    job_id = daemon.service.journal.jobs_in(JobState.DONE)[0].id
    with chromium() as driver:
        driver.get(f"{url}/jobs/{job_id}")
        box = driver.find_element("css selector", "#compare")
        wait_for(lambda: "live" in box.get_attribute("class"), 5, what="the slider set up")
        after = box.find_element("css selector", ".after")
        assert after.value_of_css_property("clip-path") == "inset(0px 50% 0px 0px)"
        slider = box.find_element("css selector", ".slider")
        slider.send_keys(Keys.END)
        assert box.get_attribute("data-split") == "100"
        assert after.value_of_css_property("clip-path") in ("inset(0px)", "inset(0px 0% 0px 0px)", "inset(0px 0px)")
        slider.send_keys(Keys.HOME)
        assert box.get_attribute("data-split") == "0"
        assert after.value_of_css_property("clip-path") == "inset(0px 100% 0px 0px)"
        assert "couple.jpg" in text_of(driver, "#job-name")
        assert "done" in text_of(driver, "#timeline")
        assert console_errors(driver) == []


def test_retry_brings_a_failed_file_back_and_it_is_restored(folders, emulator, dashboard):
    daemon, url = dashboard
    emulator.inject("outcome_failed")
    drop_scan(folders, "faded.jpg", size=(96, 128))
    wait_for(lambda: (folders["failed"] / "faded.jpg").exists(), 30, what="the file in failed/")
    with chromium() as driver:
        driver.get(url + "/failed")
        assert "faded.jpg" in driver.page_source
        click(driver, "button.retry")
        wait_for(lambda: "sent back to the inbox" in text_of(driver, "#notice"), 10, what="the retry notice")
        wait_for(lambda: (folders["outbox"] / "faded.png").exists(), 30, what="the retried file restored")
        driver.get(url + "/failed")
        assert "Nothing has failed." in driver.page_source


def test_pause_stops_new_submits_until_resume(folders, emulator, dashboard):
    daemon, url = dashboard
    with chromium() as driver:
        driver.get(url + "/")
        click(driver, "#pause-switch")
        wait_for(lambda: "paused by a person" in text_of(driver, "#paused-reason"), 10, what="the pause shown")
        wait_for(lambda: daemon.service.scheduler.pauses.by_person, 10, what="the daemon following the pause")
        drop_scan(folders, "waits.jpg", size=(96, 128))
        wait_for(lambda: daemon.service.journal.count_in(JobState.PENDING) == 1, 10, what="the file taken")
        daemon.wait_for_passes(1.5)
        assert emulator.stats()["submits_accepted"] == 0
        driver.get(url + "/")
        assert text_of(driver, "#pause-switch") == "Resume submits"
        click(driver, "#pause-switch")
        wait_for(lambda: (folders["outbox"] / "waits.png").exists(), 30, what="the file restored after resume")
        assert emulator.stats()["submits_accepted"] == 1


def test_a_hostile_file_name_renders_as_text(folders, emulator, dashboard):
    from selenium.common.exceptions import NoAlertPresentException

    daemon, url = dashboard
    drop_scan(folders, HOSTILE, size=(96, 128))
    wait_for(lambda: daemon.service.journal.count_in(JobState.DONE) == 1, 30, what="the hostile name restored")
    job_id = daemon.service.journal.jobs_in(JobState.DONE)[0].id
    with chromium() as driver:
        for path in ("/", "/jobs", f"/jobs/{job_id}"):
            driver.get(url + path)
            assert HOSTILE in driver.find_element("css selector", "main").text, path
            assert driver.find_elements("css selector", 'img[src="x"]') == [], path
            with pytest.raises(NoAlertPresentException):
                driver.switch_to.alert.text  # noqa: B018 - reading it is the check


def test_without_the_token_only_the_login_page_is_reachable(folders, emulator, make_config, run_daemon, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    daemon = run_daemon(make_config(dashboard={"listen": "127.0.0.1:0", "token_file": str(token_file)}))
    url = daemon.service.dashboard.url
    with chromium() as driver:
        for path in ("/", "/jobs", "/failed", "/jobs/1"):
            driver.get(url + path)
            assert driver.current_url == url + "/login", path
            assert "Sign in" in driver.title
        driver.find_element("name", "token").send_keys("a wrong token, surely")
        click(driver, "#sign-in")
        # The answer to the form is a new page: wait for it, not for the click to return.
        wait_for(lambda: "not the dashboard's token" in driver.page_source, 10, what="the wrong token refused")
        driver.find_element("name", "token").send_keys(TOKEN)
        click(driver, "#sign-in")
        wait_for(lambda: driver.current_url == url + "/", 10, what="the overview after signing in")
        assert driver.find_element("css selector", "#counts")
        cookie = driver.get_cookie("cfd_session")
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"


def test_the_demo_keeps_its_dashboard_up_and_the_readme_screenshots_come_from_it(tmp_path):
    """`codeformer-daemon demo --dashboard` serves the dashboard until Ctrl-C; the README's screenshots
    are taken here (set CODEFORMER_SCREENSHOTS=docs to write them into the checkout)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stderr = open(tmp_path / "demo.stderr", "w")
    demo = subprocess.Popen([sys.executable, "-m", "daemon.cli", "demo", "--dir", str(tmp_path / "demo"),
                             "--latency", "0.3", "--dashboard", f"127.0.0.1:{port}"],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if "The dashboard is at" in line:
                break
        assert any("Restored 4 of 4" in line for line in lines), "".join(lines)
        url = f"http://127.0.0.1:{port}"
        target = Path(os.environ.get("CODEFORMER_SCREENSHOTS") or tmp_path)
        target.mkdir(parents=True, exist_ok=True)
        with chromium(1200, 1000) as driver:
            driver.get(url + "/")
            wait_for(lambda: len(driver.find_elements("css selector", "#latest img")) == 8, 10,
                     what="the demo's four before/after pairs")
            driver.save_screenshot(str(target / "dashboard-overview.png"))
            click(driver, "#latest a")
            wait_for(lambda: "live" in (driver.find_element("css selector", "#compare").get_attribute("class") or ""),
                     10, what="the job page's comparison")
            driver.save_screenshot(str(target / "dashboard-job.png"))
        assert (target / "dashboard-overview.png").stat().st_size > 10_000
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            assert demo.wait(60) == 0
        except subprocess.TimeoutExpired:
            demo.send_signal(signal.SIGUSR1)  # every thread's stack, for the failure message
            time.sleep(1)
            demo.kill()
            pytest.fail("the demo did not stop within 60 s of Ctrl-C; its threads:\n"
                        + (tmp_path / "demo.stderr").read_text()[-20000:])
        finally:
            stderr.close()
