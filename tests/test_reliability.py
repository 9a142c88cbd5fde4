"""The fault matrix (README, "Reliability"): each fault injected by the fake server, and
what the real script does about it. Plus kill -9 at random points, two runs at once and a
soak run with seeded random faults."""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import FAST, SCRIPT, SEEN_SECRETS, Env, assert_no_secrets
from fake_freesound import Chaos, FakeFreesound, FakeSound, make_sounds

import download_freesound_library as dl

THROTTLED_MINUTE = "Request was throttled because of exceeding a request limit rate (60/minute)"


def _assert_library_exact(env: Env, expected_ids) -> None:
    """One metadata entry per sound, each file complete and byte-exact, no stray files."""
    entries = env.metadata()
    assert [e["id"] for e in entries] == sorted(expected_ids)
    for entry in entries:
        data = (env.out / entry["file"]).read_bytes()
        assert data == env.fake.sounds[entry["id"]].data, entry["file"]
        assert hashlib.md5(data).hexdigest() == entry["md5"]
    assert sorted(env.audio_files()) == sorted(e["file"] for e in entries)
    for line in (env.out / "ATTRIBUTION.txt").read_text().splitlines():
        assert "licensed under" not in line or any(f"/s/{i}/" in line for i in expected_ids)


def _wait_for_downloads(fake: FakeFreesound, count: int, timeout_s: float = 20) -> None:
    """Until the server has seen `count` download requests: the run holds its lock by then."""
    deadline = time.monotonic() + timeout_s
    while len(fake.downloads()) < count:
        assert time.monotonic() < deadline, "the first run never started downloading"
        time.sleep(0.02)


def _popen(env: Env, *args: str, out=None) -> subprocess.Popen:
    argv = [sys.executable, str(SCRIPT), *FAST, "--output-dir", str(out or env.out), *args]
    return subprocess.Popen(argv, env=env.environ, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- network faults -------------------------------------------------------------------------

def test_an_unreachable_server_is_retried_then_one_clear_error(env):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = env.run("--query", "rain", "--retries", "2",
                     env={"FREESOUND_API_URL": f"http://127.0.0.1:{port}/apiv2"})
    assert result.returncode == 1, result.output
    assert "network error" in result.stderr and "gave up after 3 tries" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_200_answer_to_a_range_request_restarts_from_zero(env):
    env.login()
    sound = env.fake.sounds[1000]
    env.out.mkdir()
    (env.out / (sound.friendly_filename() + ".part")).write_bytes(b"stale bytes of another version")
    env.fake.inject(r"/sounds/1000/download/$", 200, sound.data, headers={"Content-Type": "application/octet-stream"})
    result = env.run("--ids", "1000")
    assert result.returncode == 0, result.output
    assert env.fake.downloads()[0]["headers"]["Range"] == "bytes=30-"
    _assert_library_exact(env, [1000])


def test_a_read_timeout_is_retried(env):
    env.login()
    sound = env.fake.sounds[1000]
    env.fake.inject(r"/sounds/1000/download/$", 200, sound.data, delay_s=2.0,
                    headers={"Content-Type": "application/octet-stream"})
    result = env.run("--ids", "1000", "--timeout", "0.5")
    assert result.returncode == 0, result.output
    assert "Timeout" in result.stderr and len(env.fake.downloads()) == 2
    _assert_library_exact(env, [1000])


def test_5xx_that_never_ends_fails_that_sound_and_the_run_goes_on(env):
    env.login()
    env.fake.inject(r"/sounds/1000/download/$", 502, "<html>Bad gateway</html>",
                    headers={"Content-Type": "text/html"}, times=10)
    result = env.run("--ids", "1000", "1001", "--retries", "2")
    assert result.returncode == 1, result.output
    assert len(env.fake.requests_to(r"/sounds/1000/download/$")) == 3  # bounded
    assert "1000" in result.stderr and "gave up" in result.stderr
    _assert_library_exact(env, [1001])


def test_an_html_page_where_json_was_expected_names_the_url_and_status(env):
    env.fake.inject(r"/search/text/$", 200, "<html>proxy login</html>", headers={"Content-Type": "text/html"})
    result = env.run("--query", "rain")
    assert result.returncode == 1, result.output
    assert "HTTP 200 for http://" in result.stderr and "/apiv2/search/text/" in result.stderr
    assert "text/html" in result.stderr and "JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_redirect_is_never_followed_so_the_token_stays_home(env):
    env.login()
    env.fake.inject(r"/download/$", 302, b"", headers={"Location": "https://evil.example/steal?x=1"})
    result = env.run("--ids", "1000")
    assert result.returncode == 1, result.output
    assert "redirect to https://evil.example/steal" in result.stderr and "x=1" not in result.stderr
    assert len(env.fake.downloads()) == 1


# -- throttling and auth faults ---------------------------------------------------------------

def test_a_suspended_credential_exits_3_with_the_servers_words(env):
    env.fake.suspended = True
    result = env.run("--query", "rain")
    assert result.returncode == 3, result.output
    assert "credential has been suspended" in result.stderr


def test_a_second_401_after_refreshing_is_an_auth_error(env):
    env.login()
    expired = {"WWW-Authenticate": 'Bearer realm="api",error="invalid_token",'
                                   'error_description="The access token has expired."'}
    env.fake.inject(r"/download/$", 401, {"detail": "Authentication credentials were not provided."},
                    headers=expired, times=2)
    result = env.run("--ids", "1000")
    assert result.returncode == 3, result.output
    assert len(env.fake.requests_to("/oauth2/access_token/", method="POST")) == 1


def test_https_required_exits_2_explaining_the_api_url(env):
    env.login()
    env.fake.inject(r"/download/$", 403, {"detail": "This resource requires a secure connection (https)"})
    result = env.run("--ids", "1000")
    assert result.returncode == 2, result.output
    assert "FREESOUND_API_URL" in result.stderr and "https" in result.stderr


def test_the_minute_wait_comes_from_the_ledger_when_there_is_no_retry_after(tmp_path):
    """A full minute window in our own ledger: wait until its oldest row leaves, not a tight loop."""
    ledger = dl.Ledger(tmp_path / "ledger.jsonl", "cid", print)
    now = 10_000.0
    with ledger.locked():
        for n in range(60):
            ledger.append("api", now - 50 + n * 0.5)
    limits = dl.Limits(dl.Config(), ledger, dl.Ui(bars=False, quiet=True), threading.Event(), clock=lambda: now)
    assert limits.minute_frees_in(60) == pytest.approx(10.0)   # the row at now-50 leaves at now+10
    assert limits.minute_frees_in(100) <= 0                     # a higher server limit: room now


# -- --jobs against a server that revokes and throttles like the real one -----------------------

def test_jobs_4_with_access_tokens_that_expire_during_the_run(env):
    """The server revokes an access token the moment it is refreshed (DOT with rotation).
    Tokens live 1 s here and downloads start every 0.25 s on 4 workers, so tokens expire
    and are replaced while other workers wait for the pacer: each must attach its token
    after that wait, or send one that is already revoked."""
    env.fake.access_lifetime_s = 1.0
    env.login()
    ids = range(1000, 1008)
    result = env.run("--ids", *map(str, ids), "--jobs", "4", "--api-rate", "240", "--rate", "60000")
    assert result.returncode == 0, result.output
    assert len(env.fake.answers(401)) <= 1, [r["path"] for r in env.fake.answers(401)]
    assert len(env.fake.requests_to("/oauth2/access_token/", method="POST")) >= 2  # tokens did expire
    _assert_library_exact(env, ids)


def test_a_token_replaced_by_another_run_is_resent_not_refreshed_again(env):
    """A 401 for a token that has been replaced meanwhile is retried with the current one,
    and that retry is not the request's one refresh (a refresh now would revoke the token
    the other run just got)."""
    env.login()
    invalid = {"WWW-Authenticate": 'Bearer realm="api",error="invalid_token",'
                                   'error_description="The access token is invalid."'}
    # Both the stale token and its replacement are refused: the resend must leave the refresh.
    env.fake.inject(r"/sounds/1000/download/$", 401, {"detail": "Authentication credentials were not provided."},
                    headers=invalid, delay_s=0.5, times=2)
    run = _popen(env, "--ids", "1000", "--jobs", "1")
    _wait_for_downloads(env.fake, 1)
    newer = env.fake.issue_token()  # while the first download waits for its answer, another run refreshes
    SEEN_SECRETS.update((newer["access_token"], newer["refresh_token"]))
    stored = {**newer, "expires_at": time.time() + newer["expires_in"], "client_id": env.fake.client_id}
    (env.state / "token.json").write_text(json.dumps(stored))
    out, err = run.communicate(timeout=30)
    assert run.returncode == 0, err
    assert_no_secrets(env.fake, out, err)
    sent = [r["headers"]["Authorization"] for r in env.fake.downloads()]
    assert len(sent) == 3 and sent[1] == f"Bearer {newer['access_token']}" and len(set(sent)) == 3
    assert len(env.fake.requests_to("/oauth2/access_token/", method="POST")) == 1


@pytest.mark.parametrize("detail, code", [
    ("Request was throttled because of exceeding a request limit rate (2000/day)", 4),
    ("Request was throttled because the ApiV2 credential has been suspended", 3),
])
def test_no_request_starts_after_the_run_decides_to_stop(env, detail, code):
    """Workers already waiting for a pacer slot when the stop comes must not send: each such
    request is one more throttled request from a credential over its limit."""
    env.login()
    env.fake.inject(r"/download/$", 429, {"detail": detail}, after=3)  # the fourth download
    result = env.run("--ids", *map(str, range(1000, 1010)), "--rate", "600", "--jobs", "4")
    assert result.returncode == code, result.output
    [refused] = env.fake.answers(429)
    late = [r["path"] for r in env.fake.requests if r["at"] > refused["answered_at"]]
    assert late == []
    assert len(env.fake.downloads()) == 4


def test_a_day_limit_from_the_server_stops_every_worker(env):
    env.login()
    env.fake.per_day = 4  # the search and three downloads
    result = env.run("--ids", *map(str, range(1000, 1010)), "--rate", "600", "--jobs", "4")
    assert result.returncode == 4, result.output
    assert len(env.fake.answers(429)) == 1 and len(env.metadata()) == 3
    assert "remaining 7" in result.stderr


def test_auth_code_with_dry_run_is_exchanged_and_said(env):
    """A code works once and for 10 minutes: a dry run must not silently drop it."""
    result = env.run("--query", "", "--dry-run", "--auth-code", env.fake.issue_code())
    assert result.returncode == 0, result.output
    assert "exchanged --auth-code" in result.stderr and "12 new" in result.stdout
    assert (env.state / "token.json").exists() and not env.fake.downloads()
    assert env.run("--ids", "1000", stdin="").returncode == 0  # the next run needs no login


def test_dry_run_counts_the_downloads_already_used_even_without_a_request(env):
    env.login()
    assert env.run("--ids", "1000", "1001").returncode == 0
    before = len(env.fake.requests)
    result = env.run("--ids", "1000", "1001", "--dry-run")
    assert result.returncode == 0, result.output
    assert "(2 used in the last 24 hours)" in result.stdout and len(env.fake.requests) == before


# -- bad local state ----------------------------------------------------------------------------

@pytest.mark.parametrize("content, warning", [
    ("{not json", "unreadable"),
    (json.dumps({"access_token": "x", "refresh_token": "y", "expires_at": 9e9, "client_id": "other"}),
     "another client id"),
])
def test_a_bad_token_file_warns_and_logs_in_again(env, content, warning):
    env.state.mkdir(mode=0o700)
    (env.state / "token.json").write_text(content)
    result = env.run("--ids", "1000", stdin=env.fake.issue_code() + "\n")
    assert result.returncode == 0, result.output
    assert warning in result.stderr
    assert json.loads((env.state / "token.json").read_text())["client_id"] == env.fake.client_id
    (env.state / "token.json").write_text(content)
    result = env.run("--ids", "1001", stdin="")  # and from cron: exit 3
    assert result.returncode == 3, result.output


def test_an_output_folder_that_cannot_be_created_exits_2(env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = env.run("--ids", "1000", "--output-dir", str(blocker / "sub"))
    assert result.returncode == 2, result.output
    assert "cannot create the output folder" in result.stderr


def test_client_secret_from_a_file_and_a_warning_for_the_flag(env, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(env.fake.client_secret + "\n")
    result = env.run("--query", "rain", "--dry-run", "--client-secret-file", str(secret_file),
                     env={"FREESOUND_CLIENT_SECRET": ""})
    assert result.returncode == 0, result.output
    result = env.run("--query", "rain", "--dry-run", "--client-secret", env.fake.client_secret)
    assert result.returncode == 0 and "visible to other users" in result.stderr


def test_leftover_temporary_files_of_a_killed_run_are_removed(env):
    env.out.mkdir()
    (env.out / ".metadata.json.abc123.tmp").write_text("[")
    env.login()
    assert env.run("--ids", "1000").returncode == 0
    assert not list(env.out.glob("*.tmp")) and not list(env.out.glob(".*.tmp"))


# -- kill -9 at random points ---------------------------------------------------------------------

def test_kill_9_at_random_points_then_one_clean_run_finishes_exactly(env):
    env.fake.add(*[FakeSound(id=i, name=f"big {i}.wav", username="u", data=os.urandom(300_000 + i))
                   for i in range(40, 52)])
    env.fake.download_delay_s = 0.02
    ids = [str(i) for i in range(40, 52)]
    env.login()
    rng = random.Random(20261127)
    for _ in range(24):
        proc = _popen(env, "--ids", *ids, "--rate", "3000")
        time.sleep(rng.uniform(0.05, 0.6))
        proc.kill()
        proc.communicate()
    env.fake.download_delay_s = 0
    result = env.run("--ids", *ids)
    assert result.returncode == 0, result.output
    _assert_library_exact(env, range(40, 52))
    assert not list(env.out.glob("*.part"))
    for line in (env.state / "ledger.jsonl").read_text().splitlines()[-3:]:
        json.loads(line)  # the tail is whole again


# -- two runs at once --------------------------------------------------------------------------------

def test_a_second_run_on_the_same_folder_exits_2_naming_the_first(env):
    env.login()
    env.fake.download_delay_s = 0.5
    first = _popen(env, "--ids", "1000", "1001", "1002", "--jobs", "1")
    _wait_for_downloads(env.fake, 1)
    second = env.run("--ids", "1000", "1001", "1002")
    assert second.returncode == 2, second.output
    assert f"pid {first.pid}" in second.stderr and "--wait-lock" in second.stderr
    first.communicate(timeout=30)
    assert first.returncode == 0


def test_with_wait_lock_the_second_run_waits_and_downloads_nothing_twice(env):
    env.login()
    env.fake.download_delay_s = 0.3
    first = _popen(env, "--ids", "1000", "1001", "1002", "--jobs", "1")
    _wait_for_downloads(env.fake, 1)
    second = _popen(env, "--ids", "1000", "1001", "1002", "1003", "--wait-lock")
    out1, err1 = first.communicate(timeout=30)
    out2, err2 = second.communicate(timeout=30)
    assert first.returncode == 0 and second.returncode == 0, err2
    assert "waiting for another run" in err2
    paths = [d["path"] for d in env.fake.downloads()]
    assert sorted(paths) == sorted(set(paths)) and len(paths) == 4
    _assert_library_exact(env, [1000, 1001, 1002, 1003])
    assert_no_secrets(env.fake, out1, err1, out2, err2)


def test_two_runs_sharing_a_state_folder_refresh_the_rotating_token_once(env, tmp_path):
    token = env.login()
    (env.state / "token.json").write_text(json.dumps({**token, "expires_at": 0}))
    env.fake.token_delay_s = 0.5  # both runs want to refresh at the same moment
    runs = [_popen(env, "--ids", "1000", "1001", out=tmp_path / "a"),
            _popen(env, "--ids", "1002", "1003", out=tmp_path / "b")]
    errors = [run.communicate(timeout=60)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert len(env.fake.requests_to("/oauth2/access_token/", method="POST")) == 1
    rows = env.ledger()
    assert sorted(r["sound_id"] for r in rows if r["kind"] == "download") == [1000, 1001, 1002, 1003]


# -- soak ---------------------------------------------------------------------------------------------

def test_soak_300_sounds_with_10_percent_random_faults(tmp_path):
    fake = FakeFreesound(make_sounds(300, start_id=10_000, size=512, seed=7)).start()
    try:
        fake.chaos = Chaos(rate=0.10, seed=42)
        env = Env(fake, tmp_path)
        env.login()
        for _ in range(3):  # a sound unlucky twice in a row fails this run and comes next run
            result = env.run("--query", "", "--daily-cap", "1000", "--api-daily-cap", "5000", timeout=100)
            if result.returncode == 0:
                break
            assert result.returncode == 1, result.output
        assert result.returncode == 0, result.output
        _assert_library_exact(env, range(10_000, 10_300))
        per_sound = len(fake.downloads()) / 300
        assert sum(fake.chaos.counts.values()) >= 20       # the faults really happened
        assert per_sound <= 1.3, (per_sound, fake.chaos.counts)
    finally:
        fake.stop()
