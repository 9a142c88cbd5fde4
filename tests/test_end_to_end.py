"""The real script, as a subprocess, against the fake Freesound server over loopback HTTP."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import CLIENT_SECRET, SCRIPT, Env, assert_no_secrets
from fake_freesound import FakeSound, make_sounds


def _byte_exact(env: Env) -> None:
    """Every metadata entry's file is on disk, complete, with the server's md5."""
    for entry in env.metadata():
        data = (env.out / entry["file"]).read_bytes()
        assert data == env.fake.sounds[entry["id"]].data
        assert hashlib.md5(data).hexdigest() == entry["md5"]


# -- login --------------------------------------------------------------------------------

def test_first_run_logs_in_with_a_pasted_code_then_searches_and_downloads(env):
    code = env.fake.issue_code()
    result = env.run("--query", "rain", stdin=code + "\n")
    assert result.returncode == 0, result.output
    assert "/oauth2/authorize/?client_id=" in result.stderr and "response_type=code" in result.stderr
    rain = sorted(s.id for s in env.fake.sounds.values() if "rain" in s.tags)
    assert [e["id"] for e in env.metadata()] == rain
    assert env.audio_files() == sorted(env.fake.sounds[i].friendly_filename() for i in rain)
    _byte_exact(env)
    token = json.loads((env.state / "token.json").read_text())
    assert token["client_id"] == env.fake.client_id and token["expires_at"] > time.time() + 3600
    assert (env.state / "token.json").stat().st_mode & 0o777 == 0o600
    assert env.state.stat().st_mode & 0o777 == 0o700
    # Downloads carried the OAuth2 bearer token; searches the API key.
    assert all(r["headers"]["Authorization"].startswith("Bearer ") for r in env.fake.downloads())
    assert all(r["headers"]["Authorization"].startswith("Token ") for r in env.fake.requests_to("/search/"))


def test_login_with_the_pasted_redirect_url_checks_state_and_uses_pkce(env):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--login"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.environ)
    watchdog = threading.Timer(30, proc.kill)  # a child that neither prints nor exits
    watchdog.start()
    try:
        assert proc.stderr is not None
        url = next((line for line in proc.stderr if "/oauth2/authorize/" in line), None)
    finally:
        watchdog.cancel()
    assert url is not None, "the program ended without printing the authorization URL"
    assert "code_challenge_method=S256" in url
    # The browser step: the fake approves at once and redirects with code and state.
    landing = requests.get(url.strip(), allow_redirects=False, timeout=10).headers["Location"]
    out, err = proc.communicate(landing + "\n", timeout=30)
    assert proc.returncode == 0, err
    assert_no_secrets(env.fake, out, err)
    assert (env.state / "token.json").exists()
    exchange = env.fake.requests_to("/oauth2/access_token/", method="POST")[-1]["query"]
    assert exchange["grant_type"] == "authorization_code" and exchange["code_verifier"]


def test_a_pasted_url_with_another_state_is_refused(env):
    code = env.fake.issue_code()
    result = env.run("--login", stdin=f"https://freesound.org/home/?code={code}&state=forged\n")
    assert result.returncode == 3, result.output
    assert "state does not match" in result.stderr
    assert not (env.state / "token.json").exists()


def test_no_one_to_answer_the_login_prompt_exits_3_pointing_to_login(env):
    result = env.run("--query", "rain", stdin="")
    assert result.returncode == 3, result.output
    assert "--login" in result.stderr and "Traceback" not in result.stderr
    assert not env.fake.downloads()


def test_auth_code_flag_exchanges_without_prompting(env):
    result = env.run("--ids", "1000", "--auth-code", env.fake.issue_code())
    assert result.returncode == 0, result.output
    assert "code:" not in result.stderr
    assert [e["id"] for e in env.metadata()] == [1000]


def test_a_used_or_expired_code_is_a_clear_auth_error(env):
    for code in (env.fake.issue_code(age_s=601), "never-issued"):
        result = env.run("--login", "--auth-code", code)
        assert result.returncode == 3, result.output
        assert "rejected the authorization code" in result.stderr


def test_a_wrong_client_secret_is_reported_as_such(env):
    result = env.run("--login", "--auth-code", env.fake.issue_code(),
                     env={"FREESOUND_CLIENT_SECRET": "wrong"})
    assert result.returncode == 3, result.output
    assert "FREESOUND_CLIENT_SECRET" in result.stderr


def test_missing_credentials_exit_3_naming_the_variables(env):
    result = env.run("--query", "rain", env={"FREESOUND_CLIENT_ID": "", "FREESOUND_CLIENT_SECRET": ""})
    assert result.returncode == 3, result.output
    assert "FREESOUND_CLIENT_ID" in result.stderr and "FREESOUND_CLIENT_SECRET" in result.stderr
    assert "freesound.org/apiv2/apply" in result.stderr


def test_an_expired_token_is_refreshed_and_the_rotated_one_saved_at_once(env):
    old = env.login()
    stored = {**old, "expires_at": time.time() - 10}
    (env.state / "token.json").write_text(json.dumps(stored))
    result = env.run("--ids", "1000")
    assert result.returncode == 0, result.output
    new = json.loads((env.state / "token.json").read_text())
    assert new["refresh_token"] != old["refresh_token"] and new["access_token"] != old["access_token"]
    assert new["refresh_token"] in env.fake.refresh_tokens  # the live one, after rotation


def test_a_401_invalid_token_mid_run_refreshes_once_and_retries(env):
    env.login()
    env.fake.expire_access_tokens()  # the server says expired although our clock does not
    result = env.run("--ids", "1000", "1001")
    assert result.returncode == 0, result.output
    assert len(env.fake.requests_to("/oauth2/access_token/", method="POST")) == 1
    assert [e["id"] for e in env.metadata()] == [1000, 1001]


def test_a_dead_refresh_token_needs_a_new_login(env):
    env.login()
    (env.state / "token.json").write_text(json.dumps({
        **json.loads((env.state / "token.json").read_text()), "expires_at": 0, "refresh_token": "revoked"}))
    result = env.run("--ids", "1000", stdin="")
    assert result.returncode == 3, result.output
    assert "new login" in result.stderr and "--login" in result.stderr


# -- selection ------------------------------------------------------------------------------

def test_filter_is_passed_as_is_and_filters(env):
    env.login()
    solr = 'license:"Creative Commons 0" bitdepth:16'
    result = env.run("--query", "", "--filter", solr)
    assert result.returncode == 0, result.output
    search = env.fake.requests_to("/search/")[0]["query"]
    assert search["filter"] == solr and search["page_size"] == "150" and search["query"] == ""
    expected = sorted(s.id for s in env.fake.sounds.values() if s.license == "Creative Commons 0" and s.bitdepth == 16)
    assert expected and [e["id"] for e in env.metadata()] == expected
    assert {e["license_name"] for e in env.metadata()} == {"CC0 1.0"}


def test_search_follows_next_pages_to_the_end(env):
    env.fake.add(*make_sounds(300, start_id=5000, size=16))
    env.login()
    result = env.run("--query", "", "--filter", "id:[5000 TO 5999]", "--dry-run")
    assert result.returncode == 0, result.output
    pages = env.fake.requests_to("/search/")
    assert [p["query"].get("page", "1") for p in pages] == ["1", "2"]
    assert "300 sounds selected" in result.stdout and "300 new" in result.stdout
    assert not env.fake.downloads()


def test_a_next_page_that_answers_404_ends_the_search(env):
    env.login()
    next_url = f"{env.fake.url}/search/?&query=&weights=&page=9&page_size=150"
    fields = ["id", "name", "username", "license", "type", "filesize", "md5"]
    first = env.fake.sounds[1000].as_json(env.fake.url, fields)
    env.fake.inject(r"/search/text/$", 200, {"count": 999, "previous": None, "next": next_url, "results": [first]})
    result = env.run("--query", "x")
    assert result.returncode == 0, result.output
    assert len(env.fake.requests_to("/search/")) == 2


def test_ids_file_with_urls_comments_and_duplicates(env, tmp_path):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# my list\n1003\n\nhttps://freesound.org/s/1001/\n"
                        "https://freesound.org/people/user1/sounds/1005/  # nice\n1003\n")
    env.login()
    result = env.run("--ids-file", str(ids_file))
    assert result.returncode == 0, result.output
    assert [e["id"] for e in env.metadata()] == [1001, 1003, 1005]
    searches = env.fake.requests_to("/search/")
    assert len(searches) == 1 and searches[0]["query"]["filter"] == "id:(1003 OR 1001 OR 1005)"
    expected = [f"/apiv2/sounds/{i}/download/" for i in (1001, 1003, 1005)]
    assert sorted(d["path"] for d in env.fake.downloads()) == expected
    _byte_exact(env)


def test_ids_from_standard_input(env):
    env.login()
    result = env.run("--ids-file", "-", "--dry-run", stdin="1000\n1001\n")
    assert result.returncode == 0, result.output
    assert "2 new" in result.stdout


def test_ids_are_fetched_150_per_search(env):
    env.fake.add(*make_sounds(320, start_id=5000, size=16))
    result = env.run("--ids", *map(str, range(5000, 5320)), "--dry-run")
    assert result.returncode == 0, result.output
    assert len(env.fake.requests_to("/search/")) == 3
    assert not env.fake.requests_to(r"/sounds/\d+/$")
    assert "320 new" in result.stdout


def test_unknown_ids_and_undownloadable_sounds_are_reported_and_exit_1(env):
    env.fake.add(FakeSound(id=777, name="pending.wav", username="u", data=b"abc", moderated=False))
    env.login()
    result = env.run("--ids", "1000", "999999", "777")
    assert result.returncode == 1, result.output
    assert "999999" in result.stderr and "777" in result.stderr
    assert [e["id"] for e in env.metadata()] == [1000]
    # The one the batch search did not return was looked up once on its own.
    assert len(env.fake.requests_to(r"/sounds/999999/$")) == 1


# -- resuming across runs and days -------------------------------------------------------------

def test_a_rerun_downloads_nothing_and_needs_no_request(env):
    env.login()
    assert env.run("--ids", "1000", "1001").returncode == 0
    before = len(env.fake.requests)
    (env.state / "token.json").unlink()
    result = env.run("--ids", "1000", "1001", env={"FREESOUND_CLIENT_SECRET": "", "FREESOUND_CLIENT_ID": ""})
    assert result.returncode == 0, result.output
    assert len(env.fake.requests) == before
    assert "skipped 2" in result.stderr


def test_a_rerun_of_a_search_downloads_only_new_sounds(env):
    env.login()
    assert env.run("--query", "rain").returncode == 0
    downloads = len(env.fake.downloads())
    env.fake.add(FakeSound(id=2000, name="new rain.wav", username="z", tags=["rain"], data=b"new!"))
    result = env.run("--query", "rain")
    assert result.returncode == 0, result.output
    assert len(env.fake.downloads()) == downloads + 1
    assert env.metadata()[-1]["id"] == 2000


def test_daily_cap_stops_with_exit_4_and_the_next_day_finishes(env):
    env.login()
    result = env.run("--query", "", "--daily-cap", "5")
    assert result.returncode == 4, result.output
    assert "remaining 7" in result.stderr and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", result.stderr)
    assert len(env.metadata()) == 5 and len(env.fake.downloads()) == 5
    credited = re.findall(r"freesound\.org/s/(\d+)/", (env.out / "ATTRIBUTION.txt").read_text())
    assert sorted(map(int, credited)) == [e["id"] for e in env.metadata()]
    # A day later: move every ledger row 25 hours back.
    rows = env.ledger()
    for row in rows:
        then = dt.datetime.fromisoformat(row["at"].replace("Z", "+00:00")) - dt.timedelta(hours=25)
        row["at"] = then.isoformat().replace("+00:00", "Z")
    (env.state / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = env.run("--query", "", "--daily-cap", "5")
    assert result.returncode == 4, result.output  # 5 more, 2 left
    env.run("--query", "", "--daily-cap", "100")
    assert len(env.metadata()) == 12 and len(env.fake.downloads()) == 12
    _byte_exact(env)


def test_the_ledger_records_every_request_with_its_kind(env):
    env.login()
    assert env.run("--ids", "1000", "1001").returncode == 0
    rows = env.ledger()
    assert [r["kind"] for r in rows] == ["api", "download", "download"]
    assert rows[0].get("sound_id") is None
    assert sorted(r["sound_id"] for r in rows[1:]) == [1000, 1001]  # in either order with --jobs
    assert all(r["client_id"] == env.fake.client_id and r["at"].endswith("Z") for r in rows)


def test_max_downloads_n_and_says_how_many_remain(env):
    env.login()
    result = env.run("--query", "", "--max", "3")
    assert result.returncode == 0, result.output
    assert len(env.fake.downloads()) == 3 and "remaining 9" in result.stderr


def test_dry_run_reports_size_and_runs_and_downloads_nothing(env):
    result = env.run("--query", "", "--daily-cap", "5", "--dry-run")
    assert result.returncode == 0, result.output
    size = sum(len(s.data) for s in env.fake.sounds.values())
    assert "12 new" in result.stdout and f"{size / 1024:.1f} KiB" in result.stdout
    assert "takes 3 runs" in result.stdout
    assert not env.fake.downloads() and not (env.state / "token.json").exists()


# -- pacing and throttling ---------------------------------------------------------------------

def test_downloads_are_paced_start_to_start_also_across_runs(env):
    env.login()
    args = ["--rate", "120", "--api-rate", "6000", "--jobs", "4"]  # one start every 0.5 s, even with 4 at once
    assert env.run("--ids", "1000", "1001", "1002", *args, fast=False).returncode == 0
    assert env.run("--ids", "1003", *args, fast=False).returncode == 0
    starts = [r["at"] for r in env.fake.downloads()]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(gaps) == 3 and min(gaps) >= 0.45, gaps


def test_api_rate_keeps_all_requests_inside_the_minute_window(env):
    env.login()
    # 2 requests a minute: the search and one download go at once; the next download is paced
    # 30 s after the first, but must wait ~60 s, until the search leaves the minute window.
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--ids", "1000", "1001",
                             "--output-dir", str(env.out), "--rate", "6000", "--api-rate", "2"],
                            env=env.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while len(env.fake.requests) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert len(env.fake.requests) == 2, "the run never got as far as its second request"
        while time.time() < env.fake.requests[1]["at"] + 1.0:  # the fake's clock: 1 s after the second
            time.sleep(0.02)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert len(env.fake.requests) == 2
    assert re.search(r"waiting (59|60) s for the rate limit", err), err

def test_rate_above_api_rate_is_noted_once(env):
    result = env.run("--ids", "1000", "--rate", "100", "--api-rate", "50", "--dry-run", fast=False)
    assert result.returncode == 0, result.output
    assert result.stderr.count("above --api-rate") == 1


def test_a_per_minute_429_waits_and_retries(env):
    env.login()
    env.fake.inject(r"/download/$", 429, {"detail": "Request was throttled because of exceeding a request "
                                                    "limit rate (60/minute)"})
    result = env.run("--ids", "1000")
    assert result.returncode == 0, result.output
    assert len(env.fake.downloads()) == 2
    assert [r["kind"] for r in env.ledger()].count("download") == 2  # the server counted both


def test_a_429_with_retry_after_is_honoured(env):
    env.login()
    env.fake.inject(r"/search/", 429, {"detail": "Request was throttled because of exceeding a request "
                                                 "limit rate (60/minute)"}, headers={"Retry-After": "1"})
    result = env.run("--query", "rain", "--dry-run")
    assert result.returncode == 0, result.output
    throttled, retried = env.fake.requests_to("/search/")
    assert throttled["status"] == 429 and retried["at"] - throttled["answered_at"] >= 1.0


def test_a_per_day_429_stops_with_exit_4(env):
    env.login()
    env.fake.per_day = 3
    result = env.run("--query", "")
    assert result.returncode == 4, result.output
    assert "2000/day" not in result.stderr and "(3/day)" in result.stderr
    assert len(env.metadata()) == 2


def test_5xx_is_retried_with_backoff(env):
    env.login()
    env.fake.inject(r"/download/$", 503, "<html>busy</html>", headers={"Content-Type": "text/html"}, times=2)
    result = env.run("--ids", "1000")
    assert result.returncode == 0, result.output
    assert len(env.fake.downloads()) == 3


# -- downloads: verification and resume ---------------------------------------------------------

def test_an_interrupted_part_file_is_resumed_with_range(env):
    env.login()
    sound = env.fake.sounds[1000]
    env.out.mkdir()
    (env.out / (sound.friendly_filename() + ".part")).write_bytes(sound.data[:700])
    result = env.run("--ids", "1000")
    assert result.returncode == 0, result.output
    assert env.fake.downloads()[0]["headers"]["Range"] == "bytes=700-"
    _byte_exact(env)
    assert env.audio_files() == [sound.friendly_filename()]


def test_a_connection_dropped_mid_body_is_resumed(env):
    env.fake.add(FakeSound(id=50, name="big.wav", username="u", data=os.urandom(3_000_000)))
    env.fake.drop_after[50] = 2_500_000  # past two whole 1 MiB chunks
    env.login()
    result = env.run("--ids", "50")
    assert result.returncode == 0, result.output
    ranges = [d["headers"].get("Range") for d in env.fake.downloads()]
    assert len(ranges) == 2 and ranges[0] is None
    # Resumed from what reached the disk (whole chunks), not from zero.
    assert re.fullmatch(r"bytes=\d+-", ranges[1]) and int(ranges[1][6:-1]) > 0
    _byte_exact(env)


def test_a_corrupt_download_is_retried_once_then_fails_without_a_final_file(env):
    env.login()
    sound = env.fake.sounds[1000]
    bad = bytes(len(sound.data))
    env.fake.inject(r"/sounds/1000/download/$", 200, bad, headers={"Content-Type": "application/octet-stream"},
                    times=2)
    result = env.run("--ids", "1000", "1001")
    assert result.returncode == 1, result.output
    assert "md5 mismatch" in result.stderr
    assert env.audio_files() == [env.fake.sounds[1001].friendly_filename()]
    assert [e["id"] for e in env.metadata()] == [1001]
    # The next run fetches it cleanly.
    assert env.run("--ids", "1000", "1001").returncode == 0
    _byte_exact(env)


def test_a_short_body_is_discarded_and_fetched_again_from_scratch(env):
    env.login()
    sound = env.fake.sounds[1000]
    env.fake.inject(r"/sounds/1000/download/$", 200, sound.data[:100],
                    headers={"Content-Type": "application/octet-stream"})
    result = env.run("--ids", "1000")
    assert result.returncode == 0, result.output
    assert "size mismatch" in result.stderr
    assert [d["headers"].get("Range") for d in env.fake.downloads()] == [None, None]
    _byte_exact(env)


def test_a_finished_file_without_metadata_is_adopted_not_downloaded(env):
    env.login()
    sound = env.fake.sounds[1000]
    env.out.mkdir()
    (env.out / sound.friendly_filename()).write_bytes(sound.data)
    result = env.run("--ids", "1000")
    assert result.returncode == 0, result.output
    assert not env.fake.downloads() and [e["id"] for e in env.metadata()] == [1000]


def test_hostile_names_stay_inside_the_output_folder(env):
    env.fake.add(FakeSound(id=31, name="../../../escape.wav", username="../..", data=b"a" * 10),
                 FakeSound(id=32, name="CON" + "x" * 400, username="NUL\\:*?", data=b"b" * 10))
    env.login()
    result = env.run("--ids", "31", "32")
    assert result.returncode == 0, result.output
    for name in env.audio_files():
        assert "/" not in name and len(name.encode()) <= 250
    assert all(p.parent == env.out for p in env.out.iterdir())


def test_metadata_and_attribution_are_written_even_when_the_run_ends_in_4(env):
    env.login()
    result = env.run("--ids", "1000", "1001", "1002", "--daily-cap", "2")
    assert result.returncode == 4
    recorded = [e["id"] for e in env.metadata()]
    attribution = (env.out / "ATTRIBUTION.txt").read_text()
    assert len(recorded) == 2
    for sound_id in (1000, 1001, 1002):
        assert (f"https://freesound.org/s/{sound_id}/" in attribution) == (sound_id in recorded)


def test_invalid_metadata_json_is_never_overwritten(env):
    env.out.mkdir()
    (env.out / "metadata.json").write_text("{oops")
    env.login()
    result = env.run("--ids", "1000")
    assert result.returncode == 2, result.output
    assert "metadata.json" in result.stderr and (env.out / "metadata.json").read_text() == "{oops"
    assert not env.fake.requests


def test_metadata_merges_across_runs_and_queries(env):
    env.login()
    assert env.run("--ids", "1002").returncode == 0
    entries = env.metadata()
    entries[0]["my_rating"] = 5  # a user's own key survives later runs
    (env.out / "metadata.json").write_text(json.dumps(entries))
    assert env.run("--query", "wind", "--max", "2").returncode == 0
    ids = [e["id"] for e in env.metadata()]
    assert ids == sorted(ids) and 1002 in ids and len(ids) == 3
    assert [e for e in env.metadata() if e["id"] == 1002][0]["my_rating"] == 5


# -- usage errors: one line, exit 2, nothing downloaded --------------------------------------------

@pytest.mark.parametrize("args, message", [
    ([], "exactly one source"),
    (["--query", "a", "--ids", "1"], "not allowed with"),
    (["--query", "a", "--sort", "newest"], "'newest'"),
    (["--ids-file", "{tmp}/bad.txt"], "bad.txt, line 2"),
    (["--ids", "1", "x2"], "'x2'"),
    (["--ids-file", "{tmp}/missing.txt"], "missing.txt"),
    (["--query", "a", "--max", "0"], "--max"),
    (["--query", "a", "--rate", "-1"], "--rate"),
    (["--query", "a", "--jobs", "0"], "--jobs"),
    (["--query", "a", "--filter", " "], "--filter"),
    (["--query", "a", "--bogus"], "--bogus"),
    (["--pack", "77", "--license", "cc0"], "--similar-to only"),
    (["--login", "--query", "a"], "--login takes no source"),
    (["--login", "--redirect-uri", "https://example.com/callback"], "--redirect-uri"),
    (["--query", "a", "--filter", "nosuchfield:1"], "undefined field nosuchfield"),  # the server's 400
])
def test_usage_errors_exit_2_with_one_line_naming_the_value(env, run_main, tmp_path, args, message):
    (tmp_path / "bad.txt").write_text("1000\nnot-a-sound\n")
    env.login()
    result = run_main(*(arg.format(tmp=tmp_path) for arg in args))
    assert result.returncode == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not env.fake.downloads()


def test_plain_http_to_a_non_loopback_host_is_refused(env, run_main, monkeypatch):
    monkeypatch.setenv("FREESOUND_API_URL", "http://freesound.org/apiv2")
    result = run_main("--query", "a")
    assert result.returncode == 2 and "https" in result.stderr


def test_a_next_link_to_another_host_never_gets_the_credentials(env):
    env.login()
    env.fake.inject(r"/search/text/$", 200, {"count": 300, "previous": None, "results": [],
                                             "next": "https://evil.example/apiv2/search/?page=2"})
    result = env.run("--query", "x")
    assert result.returncode == 1, result.output
    assert "refusing to send credentials" in result.stderr
    assert len(env.fake.requests) == 1


def test_help_documents_the_exit_codes():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for line in ("0    everything selected", "2    usage", "3    authentication", "4    stopped at a daily",
                 "130  interrupted"):
        assert line in result.stdout


def test_importing_the_script_has_no_side_effects(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import download_freesound_library"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and not result.stdout and not result.stderr
    assert not list(tmp_path.iterdir())


def test_secrets_never_appear_in_debug_output(env):
    env.login()
    env.fake.expire_access_tokens()
    result = env.run("--ids", "1000", "--debug")
    assert result.returncode == 0, result.output
    assert CLIENT_SECRET not in result.stderr  # run() also checks every token seen


def test_search_pages_and_downloads_reuse_one_keep_alive_connection(env):
    env.fake.add(*make_sounds(160, start_id=5000, size=16))
    env.login()
    result = env.run("--ids", *map(str, range(5000, 5160)), "--max", "3", "--jobs", "1")
    assert result.returncode == 0, result.output
    assert len(env.fake.requests_to("/search/")) == 2 and len(env.fake.downloads()) == 3
    assert env.fake.connections == 1


def test_filter_helpers_compile_into_the_search_filter_and_select_what_they_say(env):
    env.login()
    result = env.run("--query", "", "--license", "cc0", "--license", "by", "--type", "wav",
                     "--min-duration", "1", "--max-duration", "20", "--tag", "field-recording")
    assert result.returncode == 0, result.output
    sent = env.fake.requests_to("/search/")[0]["query"]["filter"]
    assert sent == ('license:("Creative Commons 0" OR "Attribution") duration:[1 TO 20] type:wav '
                    'tag:"field-recording"')
    expected = sorted(s.id for s in env.fake.sounds.values()
                      if s.license in ("Creative Commons 0", "Attribution") and s.type == "wav"
                      and 1 <= s.duration <= 20 and "field-recording" in s.tags)
    assert expected and [e["id"] for e in env.metadata()] == expected


def test_print_filter_shows_the_compiled_filter_and_needs_nothing_else(env):
    result = env.run("--print-filter", "--license", "by-nc", "--channels", "1", "-f", "tag:a OR tag:b",
                     env={"FREESOUND_CLIENT_ID": "", "FREESOUND_CLIENT_SECRET": ""})
    assert result.returncode == 0, result.output
    assert result.stdout == '(tag:a OR tag:b) license:("Attribution NonCommercial") channels:1\n'
    assert not env.fake.requests


def test_failed_sounds_go_to_failed_ids_txt_and_leave_it_when_they_succeed(env):
    env.fake.add(FakeSound(id=777, name="pending.wav", username="u", data=b"abc", moderated=False))
    env.login()
    result = env.run("--ids", "1000", "777", "999999")
    assert result.returncode == 1, result.output
    failed = (env.out / "failed_ids.txt").read_text()
    assert "777  # " in failed and "not available" in failed and "999999  # " in failed
    env.fake.sounds[777].moderated = True
    env.fake.add(FakeSound(id=999999, name="late.wav", username="u", data=b"late"))
    result = env.run("--ids-file", str(env.out / "failed_ids.txt"))  # the file is a valid --ids-file
    assert result.returncode == 0, result.output
    assert not (env.out / "failed_ids.txt").exists()
    assert sorted(e["id"] for e in env.metadata()) == [777, 1000, 999999]


def test_json_prints_one_summary_object_on_stdout(env):
    env.fake.add(FakeSound(id=777, name="pending.wav", username="u", data=b"abc", moderated=False))
    env.login()
    result = env.run("--ids", "1000", "1001", "777", "--json", "--daily-cap", "10")
    assert result.returncode == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["downloaded"] == 2 and summary["exit_code"] == 1
    assert summary["failed"][0]["id"] == 777 and "not available" in summary["failed"][0]["reason"]
    assert summary["window"]["downloads_left"] == 10 - 3 and summary["window"]["daily_cap"] == 10
    assert "downloaded 2" in result.stderr  # human progress stays on stderr
    error = env.run("--query", "x", "--json", env={"FREESOUND_CLIENT_ID": ""})
    assert json.loads(error.stdout) == {"error": json.loads(error.stdout)["error"], "exit_code": 3}


def test_dry_run_json_and_licence_table(env):
    result = env.run("--query", "", "--dry-run", "--json")
    assert result.returncode == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["new"] == 12 and sum(r["sounds"] for r in summary["by_license"].values()) == 12
    assert set(summary["by_license"]) == {"CC0 1.0", "CC BY 4.0", "CC BY-NC 4.0", "Sampling+ 1.0"}
    table = env.run("--query", "", "--dry-run").stdout
    assert "| licence | sounds | size |" in table and "| CC BY-NC 4.0 | 3 |" in table


def test_sidecars_sit_beside_each_audio_file(env):
    env.login()
    result = env.run("--ids", "1000", "--sidecars")
    assert result.returncode == 0, result.output
    name = env.fake.sounds[1000].friendly_filename()
    sidecar = json.loads((env.out / f"{name}.json").read_text())
    assert sidecar["id"] == 1000 and sidecar["file"] == name
    assert sidecar["attribution"].endswith("(https://freesound.org/s/1000/) licensed under CC0 1.0")


def _ledger_rows(client_id: str, *ages_s: float) -> str:
    now = time.time()
    return "".join(json.dumps({"at": dt.datetime.fromtimestamp(now - age, dt.UTC).isoformat()
                               .replace("+00:00", "Z"), "client_id": client_id, "kind": "download",
                               "sound_id": 1}) + "\n" for age in ages_s)


def test_wait_sleeps_until_the_window_frees_and_finishes(env):
    env.login()
    # The cap of 2 is used up by downloads 24 hours minus 2 seconds ago: the window frees shortly.
    (env.state / "ledger.jsonl").write_text(_ledger_rows(env.fake.client_id, 86398, 86397.5))
    started = time.monotonic()
    result = env.run("--ids", "1000", "1001", "--daily-cap", "2", "--wait")
    assert result.returncode == 0, result.output
    assert "--wait: sleeping until" in result.stderr and time.monotonic() - started >= 1.5
    assert sorted(e["id"] for e in env.metadata()) == [1000, 1001]


def test_without_wait_the_same_run_stops_with_exit_4(env):
    env.login()
    (env.state / "ledger.jsonl").write_text(_ledger_rows(env.fake.client_id, 86398, 86397.5))
    result = env.run("--ids", "1000", "1001", "--daily-cap", "2")
    assert result.returncode == 4, result.output


def test_status_reports_windows_login_and_library_without_any_request(env):
    env.login()
    assert env.run("--ids", "1000", "1001").returncode == 0
    before = len(env.fake.requests)
    result = env.run("--status", "--daily-cap", "10")
    assert result.returncode == 0, result.output
    assert "2 of 10 used" in result.stdout and "8 left" in result.stdout and "valid until" in result.stdout
    assert "2 sounds present" in result.stdout
    state = json.loads(env.run("--status", "--json").stdout)
    assert state["window"]["downloads_used"] == 2 and state["sounds_present"] == 2
    assert len(env.fake.requests) == before


def _pack_and_bookmarks(fake) -> None:
    for sound_id in (1001, 1002, 1003):
        fake.sounds[sound_id].pack_id = 77
    fake.bookmarks = {0: ("Uncategorized", [1005]), 3: ("Rain for film", [1006, 1008])}


def test_pack_source_pages_with_metadata_in_the_same_call(env):
    _pack_and_bookmarks(env.fake)
    env.login()
    result = env.run("--pack", "77")
    assert result.returncode == 0, result.output
    assert sorted(e["id"] for e in env.metadata()) == [1001, 1002, 1003]
    listing = env.fake.requests_to("/packs/77/sounds/")
    assert len(listing) == 1 and listing[0]["query"]["page_size"] == "150"
    assert "md5" in listing[0]["query"]["fields"]
    assert not env.fake.requests_to(r"/sounds/\d+/$")  # no per-sound metadata requests


def test_user_source_follows_drf_next_links(env):
    env.fake.add(*make_sounds(160, start_id=5000, size=16))
    for sound in env.fake.sounds.values():
        sound.username = "prolific" if sound.id >= 5000 else sound.username
    result = env.run("--user", "prolific", "--dry-run")
    assert result.returncode == 0, result.output
    assert "160 new" in result.stdout and len(env.fake.requests_to("/users/prolific/sounds/")) == 2


def test_unknown_pack_is_a_usage_error(env):
    result = env.run("--pack", "424242", "--dry-run")
    assert result.returncode == 2 and "pack 424242 not found" in result.stderr


def test_bookmarks_list_categories_then_download_one_by_name_with_oauth(env):
    _pack_and_bookmarks(env.fake)
    env.login()
    listing = env.run("--bookmarks")
    assert listing.returncode == 0, listing.output
    assert "Uncategorized (1 sounds)" in listing.stdout and "Rain for film (2 sounds)" in listing.stdout
    result = env.run("--bookmarks", "rain for film")
    assert result.returncode == 0, result.output
    assert sorted(e["id"] for e in env.metadata()) == [1006, 1008]
    me = env.fake.requests_to("/me/")
    assert me and all(r["headers"]["Authorization"].startswith("Bearer ") for r in me)


def test_login_through_a_loopback_redirect_needs_no_copy_paste(env, tmp_path):
    browser = tmp_path / "browser"  # stands in for the user's browser: follows the redirect
    browser.write_text(f"#!{sys.executable}\nimport sys, urllib.request\nurllib.request.urlopen(sys.argv[1])\n")
    browser.chmod(0o755)
    result = env.run("--login", "--redirect-uri", "http://127.0.0.1/callback", env={"BROWSER": str(browser)})
    assert result.returncode == 0, result.output
    assert (env.state / "token.json").exists()
    authorize = env.fake.requests_to("/oauth2/authorize/")[0]["query"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/callback", authorize["redirect_uri"])  # an ephemeral port
    assert authorize["code_challenge_method"] == "S256" and authorize["state"]
    exchange = env.fake.requests_to("/oauth2/access_token/", method="POST")[0]["query"]
    assert exchange["redirect_uri"] == authorize["redirect_uri"] and exchange["code_verifier"]


def test_previews_need_no_login_and_never_share_a_folder_with_originals(env, tmp_path):
    result = env.run("--ids", "1000", "1001", "--previews", "lq-ogg")  # no token.json at all
    assert result.returncode == 0, result.output
    entries = env.metadata()
    assert [e["preview"] for e in entries] == ["lq-ogg", "lq-ogg"]
    for entry in entries:
        sound = env.fake.sounds[entry["id"]]
        assert entry["file"].endswith("__preview-lq.ogg") and entry["type"] == "ogg"
        assert (env.out / entry["file"]).read_bytes() == sound.preview_bytes("lq", "ogg")
        assert entry["filesize"] == len(sound.preview_bytes("lq", "ogg"))
    assert not env.fake.downloads() and not env.fake.requests_to("/oauth2/")
    previews = env.fake.requests_to("/previews/")
    assert len(previews) == 2 and all("Authorization" not in r["headers"] for r in previews)
    assert all(r["headers"]["Authorization"].startswith("Token ") for r in env.fake.requests_to("/search/"))
    mixed = env.run("--ids", "1002")  # originals into the previews folder
    assert mixed.returncode == 2 and "another --output-dir" in mixed.stderr
    again = env.run("--ids", "1000", "1001", "--previews", "lq-ogg")
    assert again.returncode == 0 and len(env.fake.requests_to("/previews/")) == 2  # nothing twice


def test_quiet_shows_only_errors(env):
    env.login()
    quiet = env.run("--ids", "1000", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""
    failing = env.run("--ids", "999999", "--quiet")
    assert failing.returncode == 1 and "999999" in failing.stderr
