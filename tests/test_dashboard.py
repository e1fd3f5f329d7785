"""The dashboard over real HTTP on loopback, against the real daemon and the emulator.

What a browser is refused matters as much as what it is shown: no file outside the previews, no
action without its CSRF token, no page without the token when one is set, every name escaped.
"""

from __future__ import annotations

import os
import re

import pytest
import requests

from daemon.journal import JobState

from .conftest import drop_scan, wait_for

TOKEN = "dashboard-token-for-tests-0123456789"
HOSTILE = "<img src=x onerror=alert(1)>.jpg"


def dashboard_url(daemon) -> str:
    return daemon.service.dashboard.url


def csrf_of(session: requests.Session, url: str) -> str:
    page = session.get(url)
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


@pytest.fixture
def open_dashboard(folders, emulator, make_config, run_daemon):
    """A daemon with its dashboard on loopback, no token."""
    daemon = run_daemon(make_config(dashboard={"listen": "127.0.0.1:0"}))
    return daemon, dashboard_url(daemon)


def test_the_pages_show_jobs_and_escape_every_name(folders, emulator, open_dashboard):
    daemon, url = open_dashboard
    drop_scan(folders, HOSTILE)
    wait_for(lambda: daemon.service.journal.count_in(JobState.DONE) == 1, 30, what="the hostile name restored")
    job_id = daemon.service.journal.jobs_in(JobState.DONE)[0].id
    session = requests.Session()
    for path in ("/", "/live", "/jobs", f"/jobs/{job_id}", "/jobs?q=onerror"):
        page = session.get(url + path)
        assert page.status_code == 200, path
        assert "<img src=x" not in page.text, path
        assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert "<script>" not in page.text and "onerror=alert" not in page.text.replace("onerror=alert(1)&gt;", "")
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in session.get(url + f"/jobs/{job_id}").text
    assert 'data-state="done"><a href="/jobs?state=done">1<' in session.get(url + "/").text


def test_only_previews_by_job_id_are_served_never_a_path(folders, emulator, open_dashboard, tmp_path):
    daemon, url = open_dashboard
    drop_scan(folders, "a.jpg")
    wait_for(lambda: daemon.service.journal.count_in(JobState.DONE) == 1, 30, what="a delivery")
    job_id = daemon.service.journal.jobs_in(JobState.DONE)[0].id
    thumbnails = daemon.config.state_dir / "thumbnails"
    wait_for(lambda: (thumbnails / f"{job_id}-after.jpg").exists(), 10, what="the after preview")
    assert requests.get(url + f"/previews/{job_id}/after.jpg").headers["Content-Type"] == "image/jpeg"
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the dashboard")
    os.symlink(secret, thumbnails / "999-before.jpg")  # a planted link under a preview's name
    for path in (f"/previews/{job_id + 1}/after.jpg", "/previews/999/before.jpg", "/previews/../journal.sqlite3",
                 "/previews/%2e%2e/%2e%2e/journal.sqlite3", f"/previews/{job_id}/../../journal.sqlite3",
                 "/static/../app.py", "/static/%2e%2e/app.py", "/static//etc/passwd", "/../config.yaml",
                 f"/previews/{job_id}/after.jpg/..%2f..%2fjournal.sqlite3"):
        answer = requests.get(url + path)
        assert answer.status_code == 404, path
        assert b"not for the dashboard" not in answer.content and b"SQLite" not in answer.content


def test_no_action_works_without_its_csrf_token(folders, emulator, open_dashboard):
    daemon, url = open_dashboard
    session = requests.Session()
    for path in ("/pause", "/failed/retry-safe"):
        assert session.post(url + path, data={}).status_code == 403
        assert session.post(url + path, data={"csrf": "0" * 64}).status_code == 403
    # A token from another browser (another CSRF cookie) does not pass either.
    other = requests.Session()
    token = csrf_of(other, url + "/")
    assert requests.post(url + "/pause", data={"csrf": token}).status_code == 403
    assert daemon.service.journal.get_meta("paused_by_person") is None
    assert other.post(url + "/pause", data={"csrf": token}, allow_redirects=False).status_code == 303
    assert daemon.service.journal.get_meta("paused_by_person") is not None


def test_without_a_loopback_host_header_an_open_dashboard_refuses(open_dashboard):
    _daemon, url = open_dashboard
    assert requests.get(url + "/", headers={"Host": "evil.example:8090"}).status_code == 403
    assert requests.get(url + "/", headers={"Host": "localhost:8090"}).status_code == 200


@pytest.fixture
def locked_dashboard(folders, emulator, make_config, run_daemon, tmp_path, captured_logs):
    token_file = tmp_path / "dashboard-token"
    token_file.write_text(TOKEN)
    daemon = run_daemon(make_config(dashboard={"listen": "127.0.0.1:0", "token_file": str(token_file)}))
    return daemon, dashboard_url(daemon)


def test_with_a_token_nothing_but_the_login_page_is_reachable(locked_dashboard):
    _daemon, url = locked_dashboard
    for path in ("/", "/live", "/jobs", "/jobs/1", "/failed", "/previews/1/before.jpg", "/static/dashboard.js"):
        answer = requests.get(url + path, allow_redirects=False)
        assert answer.status_code in (303, 401, 404) and answer.status_code != 200, path
        if answer.status_code == 303:
            assert answer.headers["Location"] == "/login"
    assert requests.get(url + "/metrics").status_code == 401
    scraped = requests.get(url + "/metrics", headers={"Authorization": "Bearer " + TOKEN})
    assert scraped.status_code == 200 and scraped.headers["Content-Type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    names = {family.name for family in text_string_to_metric_families(scraped.text)}
    assert {"codeformer_jobs", "codeformer_submits_paused", "codeformer_files_detected"} <= names
    assert requests.post(url + "/pause").status_code == 401
    assert requests.get(url + "/login").status_code == 200
    assert requests.get(url + "/", headers={"Authorization": "Bearer " + TOKEN}).status_code == 200
    assert requests.get(url + "/", headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"},
                        allow_redirects=False).status_code == 401


def test_login_sets_a_strict_http_only_cookie_and_failures_are_rate_limited(locked_dashboard, captured_logs):
    _daemon, url = locked_dashboard
    session = requests.Session()
    token = csrf_of(session, url + "/login")
    answer = session.post(url + "/login", data={"csrf": token, "token": TOKEN}, allow_redirects=False)
    assert answer.status_code == 303
    cookie = [v for k, v in answer.raw.headers.items() if k.lower() == "set-cookie" and "cfd_session" in v][0]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert session.get(url + "/").status_code == 200

    intruder = requests.Session()
    token = csrf_of(intruder, url + "/login")
    codes = [intruder.post(url + "/login", data={"csrf": token, "token": f"guess-{i}"}).status_code
             for i in range(7)]
    assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]
    # Even the right token waits out the limit, so guessing cannot be sped up by mixing in the right one.
    assert intruder.post(url + "/login", data={"csrf": token, "token": TOKEN}).status_code == 429
    assert not any(TOKEN in str(event) for event in captured_logs)


def test_a_failed_file_is_retried_from_the_dashboard_and_restored(folders, emulator, open_dashboard):
    daemon, url = open_dashboard
    emulator.inject("outcome_failed")
    drop_scan(folders, "face.jpg")
    # The original reaches failed/ first; the job is FAILED (and on the page) once its record is written.
    wait_for(lambda: daemon.service.journal.jobs_in(JobState.FAILED), 30, what="the job failed")
    session = requests.Session()
    page = session.get(url + "/failed")
    assert "face.jpg" in page.text and "provider_failed" in page.text
    job_id = daemon.service.journal.jobs_in(JobState.FAILED)[0].id
    answer = session.post(url + f"/jobs/{job_id}/retry", data={"csrf": csrf_of(session, url + "/failed")})
    assert answer.status_code == 200 and "1 file(s) sent back to the inbox" in answer.text
    wait_for(lambda: (folders["outbox"] / "face.png").exists(), 30, what="the retried file restored")


def daemon_states(config) -> dict[int, str]:
    from daemon.journal import Journal

    journal = Journal(config.state_dir / "journal.sqlite3", read_only=True)
    try:
        return {row["id"]: row["state"] for row in journal.read("SELECT id, state FROM jobs")}
    finally:
        journal.close()


def test_the_daemon_removes_previews_of_jobs_finished_before_the_retention(folders, emulator, make_config,
                                                                           run_daemon):
    config = make_config(dashboard={"listen": "127.0.0.1:0", "retention_days": 1})
    daemon = run_daemon(config)
    drop_scan(folders, "old.jpg")
    wait_for(lambda: daemon.service.journal.count_in(JobState.DONE) == 1, 30, what="a delivery")
    done_id = daemon.service.journal.jobs_in(JobState.DONE)[0].id
    daemon.stop()
    thumbnails = config.state_dir / "thumbnails"
    from daemon.journal import Journal

    journal = Journal(config.state_dir / "journal.sqlite3")
    waiting = journal.add_job("at-the-provider.jpg", 10, 1, {"upscale": 2})
    # Unfinished: at the provider (an id it does not know yet), polled on and on for the test's length.
    journal._db.execute("UPDATE jobs SET state = 'submitted', request_id = 'req-unknown', polling_url = ?, "
                        "submitted_at = ? WHERE id = ?",
                        (f"{emulator.status_url}/req-unknown", __import__("time").time(), waiting.id))
    journal.close()
    two_days_ago = __import__("time").time() - 2 * 86400
    for name in (f"{done_id}-before.jpg", f"{done_id}-after.jpg", f"{waiting.id}-before.jpg"):
        (thumbnails / name).write_bytes(b"\xff\xd8 a preview") if not (thumbnails / name).exists() else None
        os.utime(thumbnails / name, (two_days_ago, two_days_ago))
    run_daemon(config)
    wait_for(lambda: not (thumbnails / f"{done_id}-after.jpg").exists(), 10, what="the old previews swept")
    assert not (thumbnails / f"{done_id}-before.jpg").exists()
    assert (thumbnails / f"{waiting.id}-before.jpg").exists(), "a preview of an unfinished job was removed"
    assert daemon_states(config)[waiting.id] == "submitted"


def test_awkward_requests_get_clear_answers_not_errors(open_dashboard):
    _daemon, url = open_dashboard
    session = requests.Session()
    # A HEAD answers without a body, so the next answer on the same connection is not garbled.
    assert session.head(url + "/jobs").status_code == 200
    assert session.get(url + "/static/favicon.svg").status_code == 200
    assert session.get(url + "/jobs?before=99999999999999999999999&after=-1").status_code == 200
    csrf_of(session, url + "/")
    assert session.post(url + "/pause", data={"csrf": "é" * 64}).status_code == 403  # not a 500
    page = session.get(url + "/failed?notice=Sign+in+again+at+http://evil.example")
    assert "evil.example" not in page.text


def test_another_apps_odd_cookie_does_not_sign_the_person_out(locked_dashboard):
    _daemon, url = locked_dashboard
    session = requests.Session()
    token = csrf_of(session, url + "/login")
    session.post(url + "/login", data={"csrf": token, "token": TOKEN})
    cookies = "; ".join(f"{c.name}={c.value}" for c in session.cookies)
    odd = {"Cookie": 'prefs={"theme": "dark"}; a=b c; ' + cookies}
    assert requests.get(url + "/jobs", headers=odd, allow_redirects=False).status_code == 200


def test_a_csrf_pair_from_the_login_page_is_no_use_once_signed_in(locked_dashboard):
    daemon, url = locked_dashboard
    stranger = requests.Session()
    stolen = csrf_of(stranger, url + "/login")
    owner = requests.Session()
    owner.post(url + "/login", data={"csrf": csrf_of(owner, url + "/login"), "token": TOKEN})
    # The owner's session with the stranger's CSRF cookie and token (planted by another localhost page).
    planted = f"cfd_session={owner.cookies['cfd_session']}; cfd_csrf={stranger.cookies['cfd_csrf']}"
    answer = requests.post(url + "/pause", data={"csrf": stolen}, headers={"Cookie": planted}, allow_redirects=False)
    assert answer.status_code == 403
    assert daemon.service.journal.get_meta("paused_by_person") is None
    assert owner.post(url + "/pause", data={"csrf": csrf_of(owner, url + "/")}, allow_redirects=False).status_code == 303


def test_wrong_bearer_tokens_are_limited_like_wrong_logins(locked_dashboard, captured_logs):
    _daemon, url = locked_dashboard
    codes = [requests.get(url + "/metrics", headers={"Authorization": f"Bearer wrong-{i}"}).status_code
             for i in range(7)]
    assert codes == [401] * 5 + [429, 429]
    assert any(e["event"] == "dashboard.login_failed" and e.get("by") == "bearer" for e in captured_logs)
