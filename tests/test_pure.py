"""Unit tests for the pure parts: parsing, names, licences, pacing arithmetic, ledger
windows, metadata merge and attribution. Time is always a number passed in."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest

import download_freesound_library as dl

# -- sound references and ID lists ----------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("123", 123),
    ("  42 ", 42),
    ("https://freesound.org/s/123/", 123),
    ("https://freesound.org/s/123", 123),
    ("http://www.freesound.org/s/7/", 7),
    ("https://freesound.org/people/Some_User/sounds/98765/", 98765),
    ("https://freesound.org/people/x/sounds/5/#comments", 5),
    ("0", None),                       # not a sound id
    ("12a", None),
    ("-5", None),
    ("https://example.com/s/123/", None),
    ("https://freesound.org/people/x/packs/5/", None),  # a pack, not a sound
    ("١٢٣", None),                     # Arabic-Indic digits pass str.isdigit, not ours
])
def test_parse_sound_ref(text, expected):
    assert dl.parse_sound_ref(text) == expected


def test_parse_id_lines_skips_comments_and_blanks_and_collapses_duplicates():
    lines = ["# my favourites", "", "3", "https://freesound.org/s/1/  # rain", "3", "  ",
             "https://freesound.org/people/a/sounds/2/", "1"]
    assert dl.parse_id_lines(lines, "ids.txt") == [3, 1, 2]


def test_parse_id_lines_names_the_file_and_line_of_a_bad_line():
    with pytest.raises(dl.UsageError, match=r"ids\.txt, line 3: .*'hello'"):
        dl.parse_id_lines(["1", "# fine", "hello"], "ids.txt")


def test_id_filter_and_batches():
    assert dl.id_filter([1, 22, 333]) == "id:(1 OR 22 OR 333)"
    assert [len(b) for b in dl.batched(list(range(301)), 150)] == [150, 150, 1]


# -- file names -------------------------------------------------------------------------

def _sound(**kw):
    return {"id": 1234, "username": "some user", "name": "My Sound.wav", "type": "wav", **kw}


@pytest.mark.parametrize("sound, expected", [
    (_sound(), "1234__some-user__my-sound.wav"),                        # Freesound's own convention
    (_sound(name="Café Crème.aiff", type="aiff"), "1234__some-user__cafe-creme.aiff"),
    (_sound(name="../../etc/passwd"), "1234__some-user__etcpasswd.wav"),
    (_sound(username="..\\evil:/", name="a\x00b\x1fc"), "1234__evil__ab-c.wav"),  # \x1f is whitespace
    (_sound(name="CON", username="NUL"), "1234__nul__con.wav"),          # id prefix: never reserved
    (_sound(name="trailing. . "), "1234__some-user__trailing.wav"),
    (_sound(name="日本語"), "1234__some-user__.wav"),                     # as Freesound's slug does
    (_sound(type="../x"), "1234__some-user__my-sound.x"),
])
def test_sound_filename_is_safe(sound, expected):
    assert dl.sound_filename(sound) == expected


@pytest.mark.parametrize("name, username", [("n" * 400, "u"), ("é" * 300, "ü" * 300), ("x", "y" * 400)])
def test_sound_filename_fits_255_bytes_even_as_a_part_file(name, username):
    file_name = dl.sound_filename(_sound(name=name, username=username))
    assert len((file_name + dl.PART_SUFFIX).encode("utf-8")) <= 255
    assert file_name.startswith("1234__") and file_name.endswith(".wav")


# -- licences ---------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("http://creativecommons.org/publicdomain/zero/1.0/", "CC0 1.0"),
    ("https://creativecommons.org/licenses/by/4.0/", "CC BY 4.0"),
    ("http://creativecommons.org/licenses/by/3.0/", "CC BY 3.0"),
    ("https://creativecommons.org/licenses/by-nc/4.0/", "CC BY-NC 4.0"),
    ("http://creativecommons.org/licenses/sampling+/1.0/", "Sampling+ 1.0"),
    ("Attribution NonCommercial", "CC BY-NC"),   # a licence name, as the docs claim it returns
    ("Creative Commons 0", "CC0"),
    ("", "unknown licence"),
])
def test_license_name(value, expected):
    assert dl.license_name(value) == expected


# -- URLs, origins, state folder ----------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("https://freesound.org/apiv2/sounds/12/download/", ("download", 12)),
    ("https://freesound.org/apiv2/sounds/12/", ("api", None)),
    ("https://freesound.org/apiv2/search/?filter=x", ("api", None)),
    ("https://freesound.org/apiv2/sounds/12/download/link/", ("api", None)),
])
def test_classify_request(url, expected):
    assert dl.classify_request(url, "https://freesound.org/apiv2") == expected


@pytest.mark.parametrize("url, allowed", [
    ("https://freesound.org/apiv2", True),
    ("http://127.0.0.1:8000/apiv2", True),
    ("http://localhost:8000/apiv2", True),
    ("http://[::1]:8000/apiv2", True),
    ("http://freesound.org/apiv2", False),
    ("http://10.0.0.1/apiv2", False),
    ("ftp://freesound.org/apiv2", False),
])
def test_check_api_base_allows_plain_http_only_on_loopback(url, allowed):
    if allowed:
        assert dl.check_api_base(url + "/") == url
    else:
        with pytest.raises(dl.UsageError):
            dl.check_api_base(url)


def test_origin_treats_default_ports_alike():
    assert dl.origin("https://freesound.org/apiv2/x") == dl.origin("https://FREESOUND.org:443/y")
    assert dl.origin("https://freesound.org/") != dl.origin("https://evil.example/")


@pytest.mark.parametrize("platform, environ, expected", [
    ("linux", {}, "/home/u/.config/freesound-downloader"),
    ("linux", {"XDG_CONFIG_HOME": "/x"}, "/x/freesound-downloader"),
    ("darwin", {}, "/home/u/Library/Application Support/freesound-downloader"),
    ("win32", {"APPDATA": "/appdata"}, "/appdata/freesound-downloader"),
])
def test_default_state_dir(platform, environ, expected):
    assert dl.default_state_dir(platform, environ, Path("/home/u")) == Path(expected)


# -- pacing, windows, retries -------------------------------------------------------------

@pytest.mark.parametrize("last, interval, now, expected", [
    (None, 2.0, 100.0, 0.0),     # first request ever
    (99.0, 2.0, 100.0, 1.0),     # started 1 s ago: wait the rest of the interval
    (95.0, 2.0, 100.0, 0.0),     # a slow download used the interval up: no extra sleep
    (100.0, 2.0, 100.0, 2.0),
    (4000.0, 2.0, 100.0, 2.0),   # the clock went back an hour: wait one interval, not an hour
])
def test_pacing_delay_is_start_to_start(last, interval, now, expected):
    assert dl.pacing_delay(last, interval, now) == pytest.approx(expected)


def test_window_counts_only_the_rolling_window():
    times = [0.0, 10.0, 50.0, 70.0]
    assert dl.times_in_window(times, now=80.0, window_s=60.0) == [50.0, 70.0]
    assert dl.window_frees_at(times, limit=3, now=80.0, window_s=60.0) == 80.0   # room now
    # limit 2 is full; the oldest inside (50) leaves at 110
    assert dl.window_frees_at(times, limit=2, now=80.0, window_s=60.0) == 110.0
    # limit 1: the window frees when all but the newest are gone: 70 + 60
    assert dl.window_frees_at(times, limit=1, now=80.0, window_s=60.0) == 130.0


def test_backoff_grows_exponentially_with_bounded_jitter():
    assert [dl.backoff_delay(n, 1.0, rand=0.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert [dl.backoff_delay(n, 1.0, rand=0.999) for n in (1, 2)] == pytest.approx([1.0, 2.0], abs=0.01)
    assert dl.backoff_delay(30, 1.0, rand=0.999) <= dl.BACKOFF_MAX_S


@pytest.mark.parametrize("value, expected", [
    (None, None),
    ("", None),
    ("7", 7.0),
    ("100000", dl.RETRY_AFTER_MAX_S),                       # capped
    ("Thu, 01 Jan 1970 00:00:30 GMT", 20.0),                 # HTTP-date, now = 10
    ("Thu, 01 Jan 1970 00:00:05 GMT", 0.0),                  # in the past: no wait
    ("soon", None),
])
def test_parse_retry_after(value, expected):
    assert dl.parse_retry_after(value, now=10.0) == expected


@pytest.mark.parametrize("detail, kind, limit", [
    ("Request was throttled because of exceeding a request limit rate (60/minute)", "minute", 60),
    ("Request was throttled because of exceeding a request limit rate (2000/day)", "day", 2000),
    ("Request was throttled because the ApiV2 credential has been suspended", "suspended", None),
])
def test_throttle_kind(detail, kind, limit):
    assert dl.throttle_kind(detail) == kind
    assert dl.throttle_limit(detail) == limit


@pytest.mark.parametrize("new, cap, used, runs", [
    (0, 500, 0, 0),
    (10, 500, 0, 1),
    (500, 500, 0, 1),
    (501, 500, 0, 2),
    (2000, 500, 0, 4),
    (100, 500, 450, 2),    # 50 today, 50 tomorrow
    (100, 500, 500, 1),    # nothing today; one more daily run
])
def test_runs_needed(new, cap, used, runs):
    assert dl.runs_needed(new, cap, used) == runs


# -- metadata and attribution ---------------------------------------------------------------

API_SOUND = {"id": 7, "name": "Rain.wav", "username": "ann", "type": "wav", "filesize": 10, "md5": "x",
             "license": "https://creativecommons.org/licenses/by-nc/4.0/", "tags": ["rain"],
             "description": "d", "pack_name": None, "created": "2020-01-01T00:00:00Z",
             "duration": 1.5, "samplerate": 44100.0, "bitdepth": 16, "channels": 2}


def test_metadata_entry_has_every_documented_key():
    entry = dl.metadata_entry(API_SOUND, "7__ann__rain.wav", "2026-01-01T00:00:00.000000Z")
    assert {"id", "name", "username", "license", "license_name", "url", "duration", "samplerate",
            "bitdepth", "channels", "type", "filesize", "md5", "tags", "description", "pack_name",
            "created", "file", "downloaded_at"} <= set(entry)
    assert entry["license_name"] == "CC BY-NC 4.0"
    assert entry["url"] == "https://freesound.org/s/7/"


def test_fold_metadata_merges_updates_keeps_user_keys_and_unchanged_lines_and_sorts():
    old = [{"id": 2, "name": "a", "my_note": "keep me"}, {"id": 4, "name": "gone"}, {"id": 9, "name": "b"},
           {"id": 9, "name": "b twice"}]
    existing = [(entry, f"  as written {entry['id']}") for entry in old]
    updates = {12: {"id": 12, "name": "d"}, 2: {"id": 2, "name": "a2"}, 5: {"id": 5, "name": "c"},
               1: {"id": 1, "name": "z"}}
    credits: list[dict] = []
    lines = list(dl.fold_metadata(existing, updates, {4, 1}, credits))
    assert lines == [dl.metadata_line({"id": 2, "name": "a2", "my_note": "keep me"}),
                     dl.metadata_line({"id": 5, "name": "c"}), "  as written 9", dl.metadata_line(updates[12])]
    assert [c["id"] for c in credits] == [2, 5, 9, 12]


def test_journal_updates_merge_later_lines_and_skip_a_torn_one():
    lines = [b'{"id": 3, "name": "a", "file": "x"}\n', b'{"id": 3, "name": "b"}\n', b'{"id": 4, "na']
    assert dl.journal_updates(lines) == {3: {"id": 3, "name": "b", "file": "x"}}


def test_iter_metadata_reads_our_layout_line_by_line_and_any_other_whole(tmp_path):
    path = tmp_path / "metadata.json"
    entries = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path.write_text(dl.metadata_text(dl.metadata_line(e) for e in entries))
    assert [(e, line) for e, line in dl.iter_metadata(path)] == [(e, dl.metadata_line(e)) for e in entries]
    path.write_text(json.dumps(entries, indent=4))  # a teammate's editor
    assert [e for e, _ in dl.iter_metadata(path)] == entries


def test_attribution_groups_by_licence_with_the_credit_header():
    entries = [
        dl.metadata_entry({**API_SOUND, "id": 3, "license": "http://creativecommons.org/publicdomain/zero/1.0/"},
                          "f", "t"),
        dl.metadata_entry(API_SOUND, "f", "t"),
        dl.metadata_entry({**API_SOUND, "id": 1, "name": "Wind", "username": "bo",
                           "license": "https://creativecommons.org/licenses/by/4.0/"}, "f", "t"),
    ]
    text = dl.attribution_text(entries)
    assert "may not be used commercially" in text and "require credit" in text
    assert text.index("CC0 1.0 (1 sound)") < text.index("CC BY 4.0 (1 sound)") < text.index("CC BY-NC 4.0")
    assert '"Wind" by bo (https://freesound.org/s/1/) licensed under CC BY 4.0\n' in text
    assert '"Rain.wav" by ann (https://freesound.org/s/7/) licensed under CC BY-NC 4.0\n' in text


# -- OAuth2 helpers --------------------------------------------------------------------------

def test_parse_pasted_code_accepts_a_bare_code_or_the_redirect_url():
    assert dl.parse_pasted_code("  abc123 \n", "s1") == "abc123"
    url = "https://freesound.org/home/app_permissions/permission_granted/?code=abc123&state=s1"
    assert dl.parse_pasted_code(url, "s1") == "abc123"


@pytest.mark.parametrize("pasted, message", [
    ("https://x/?code=abc&state=other", "state does not match"),
    ("https://x/?code=abc", "state does not match"),
    ("https://x/?error=access_denied&state=s1", "access_denied"),
    ("https://x/?state=s1", "no 'code'"),
])
def test_parse_pasted_code_rejects_bad_urls(pasted, message):
    with pytest.raises(dl.AuthError, match=message):
        dl.parse_pasted_code(pasted, "s1")


def test_pkce_challenge_is_the_s256_of_the_verifier():
    import base64
    import hashlib
    verifier, challenge = dl.pkce_pair()
    assert 43 <= len(verifier) <= 128
    expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert challenge == expected


# -- files: atomic writes, ledger, token store ---------------------------------------------------

def test_write_json_atomic_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "m.json"
    dl.write_json_atomic(path, [1])
    dl.write_json_atomic(path, [{"id": 2, "name": "é"}])
    assert path.read_text(encoding="utf-8").startswith('[\n  {\n    "id": 2')
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_load_metadata_refuses_invalid_json_and_keeps_the_file(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text("[{\"id\": 1}, ")
    with pytest.raises(dl.UsageError, match="not valid metadata"):
        dl.load_metadata(path)
    assert path.read_text() == "[{\"id\": 1}, "


def test_ledger_skips_a_torn_last_line_and_counts_only_its_client(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"at": "2026-01-01T00:00:00Z", "client_id": "a", "kind": "api"}\n'
                    '{"at": "2026-01-01T00:00:01Z", "client_id": "b", "kind": "download", "sound_id": 1}\n'
                    '{"at": "2026-01-01T00:00:02Z", "client_id": "a", "kind": "download", "sound_id": 2}\n'
                    '{"at": "2026-01-01T00:0')
    warnings: list[str] = []
    ledger = dl.Ledger(path, "a", warnings.append)
    assert len(ledger.times()) == 2 and len(ledger.times("download")) == 1
    assert warnings and "line 4" in warnings[0]


def test_ledger_append_writes_the_documented_row(tmp_path):
    ledger = dl.Ledger(tmp_path / "ledger.jsonl", "cid", print)
    with ledger.locked():
        ledger.append("download", 0.0, sound_id=5)
    row = __import__("json").loads((tmp_path / "ledger.jsonl").read_text())
    assert row == {"at": "1970-01-01T00:00:00.000000Z", "client_id": "cid", "kind": "download", "sound_id": 5}


def test_a_torn_ledger_line_is_terminated_so_the_next_row_survives(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"at": "2026-01-01T00:00:00Z", "client_id": "cid", "kind": "api"}\n{"at": "2026-0')
    ledger = dl.Ledger(path, "cid", lambda message: None)
    with ledger.locked():
        ledger.append("download", 10.0, sound_id=1)
    assert ledger.times("download") == [10.0]
    assert len(dl.Ledger(path, "cid", lambda message: None).times()) == 2  # and so does a new reader


def test_ledger_sees_rows_another_process_appended(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ours, theirs = dl.Ledger(path, "cid", print), dl.Ledger(path, "cid", print)
    with theirs.locked():
        theirs.append("download", 5.0, sound_id=9)
    with ours.locked():
        ours.sync()
    assert ours.times("download") == [5.0]


def test_token_store_is_private_and_checks_the_client_id(tmp_path):
    store = dl.TokenStore(tmp_path / "state" / "token.json", "cid")
    token = store.save({"access_token": "a", "refresh_token": "r", "expires_in": 86400,
                        "token_type": "Bearer", "scope": "read write"}, now=1000.0)
    assert token["expires_at"] == 87400.0 and token["client_id"] == "cid"
    assert (tmp_path / "state" / "token.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    warnings: list[str] = []
    assert dl.TokenStore(store.path, "other").load(warnings.append) is None
    assert "another client id" in warnings[0]


def test_format_utc():
    moment = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert dl.format_utc(moment) == "2026-01-02 03:04:05 UTC"
    assert dl.format_utc(moment.timestamp()) == "2026-01-02 03:04:05 UTC"


# -- download helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize("status, content_range, offset, size, expected", [
    (200, None, 500, 1000, 0),                        # server ignored Range: start over
    (206, "bytes 500-999/1000", 500, 1000, 500),
    (206, "bytes 500-999/*", 500, 1000, 500),          # unknown complete length is allowed
    (206, "bytes 0-999/1000", 500, 1000, ValueError),  # not where we asked to start
    (206, "bytes 500-999/2000", 500, 1000, ValueError),  # another file's length
    (206, None, 500, 1000, ValueError),
    (206, "items 1-2/3", 500, 1000, ValueError),
])
def test_resumed_offset_validates_content_range(status, content_range, offset, size, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match="Content-Range"):
            dl.resumed_offset(status, content_range, offset, size)
    else:
        assert dl.resumed_offset(status, content_range, offset, size) == expected


def test_a_full_disk_removes_the_part_file_and_is_one_clear_error(tmp_path, monkeypatch):
    import errno
    import hashlib

    part = tmp_path / "1__u__n.wav.part"
    real_open = Path.open

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.handle.close()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FullDisk(real_open(self, *a, **k)))
    ui = dl.Ui(bars=False)
    with pytest.raises(dl.UsageError, match="No space left on device"):
        dl._write_body([b"x" * 10, b"y" * 10], part, 0, hashlib.md5(), 20, ui, "n")
    assert not part.exists()


def test_metadata_text_is_a_json_array_with_one_sound_per_line():
    import json
    entries = [{"id": 1, "name": "é"}, {"id": 2, "tags": ["a", "b"]}]
    text = dl.metadata_text(dl.metadata_line(e) for e in entries)
    assert json.loads(text) == entries
    assert text.splitlines()[1:3] == ['  {"id": 1, "name": "é"},', '  {"id": 2, "tags": ["a", "b"]}']
    assert json.loads(dl.metadata_text([])) == []


@pytest.mark.parametrize("signum, raised", [("SIGINT", KeyboardInterrupt), ("SIGTERM", dl.Terminated)])
def test_signals_are_held_until_a_file_and_its_metadata_have_landed(signum, raised):
    import os
    import signal
    previous = signal.signal(signal.SIGTERM, dl._raise_terminated)
    try:
        steps = []
        with pytest.raises(raised):
            with dl.signals_deferred():
                os.kill(os.getpid(), getattr(signal, signum))
                steps.append("rename")      # still running: the signal is held
                steps.append("metadata")
        assert steps == ["rename", "metadata"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_background_md5_equals_hashlib_and_always_stops_its_thread():
    import hashlib
    import threading
    chunks = [bytes([n]) * 70_000 for n in range(20)]
    with dl.BackgroundMd5(hashlib.md5()) as digest:
        for chunk in chunks:
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.md5(b"".join(chunks)).hexdigest()
    before = threading.active_count()
    with pytest.raises(RuntimeError):
        with dl.BackgroundMd5(hashlib.md5()) as digest:
            digest.update(b"x")
            raise RuntimeError("the download failed")
    assert threading.active_count() == before


def test_the_ledger_lock_serialises_threads_as_well_as_processes(tmp_path):
    import threading
    ledger = dl.Ledger(tmp_path / "ledger.jsonl", "cid", print)
    errors = []

    def append_many(worker: int) -> None:
        try:
            for n in range(50):
                with ledger.locked():
                    ledger.sync()
                    ledger.append("download", worker * 1000 + n, sound_id=n)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=append_many, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(ledger.times()) == 400
    assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == 400


# -- filter helpers ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    ({}, None),
    ({"user_filter": "tag:rain"}, "tag:rain"),
    ({"licenses": ["cc0"]}, 'license:("Creative Commons 0")'),
    ({"licenses": ["by", "by-nc", "by"]}, 'license:("Attribution" OR "Attribution NonCommercial")'),
    ({"licenses": ["sampling+"]}, 'license:("Sampling+")'),
    ({"min_duration": 1.5}, "duration:[1.5 TO *]"),
    ({"max_duration": 30}, "duration:[* TO 30]"),
    ({"min_duration": 0, "max_duration": 2}, "duration:[0 TO 2]"),
    ({"types": ["wav"]}, "type:wav"),
    ({"types": ["wav", "flac"]}, "type:(wav OR flac)"),
    ({"samplerate": 48000, "bitdepth": 24, "channels": 1}, "samplerate:48000 bitdepth:24 channels:1"),
    ({"tags": ["rain", "heavy rain"]}, 'tag:"rain" tag:"heavy rain"'),
    ({"tags": ['say "hi"', "back\\slash"]}, 'tag:"say \\"hi\\"" tag:"back\\\\slash"'),
    ({"user_filter": "tag:a OR tag:b", "channels": 2}, "(tag:a OR tag:b) channels:2"),  # keep its meaning
    ({"user_filter": "tag:a OR tag:b"}, "tag:a OR tag:b"),                              # alone: as is
    ({"user_filter": "pack:x", "licenses": ["cc0"], "tags": ["dog"]},
     'pack:x license:("Creative Commons 0") tag:"dog"'),
])
def test_build_filter(kwargs, expected):
    user_filter = kwargs.pop("user_filter", None)
    assert dl.build_filter(user_filter, dl.filter_clauses(**kwargs)) == expected


def _failed_ids(text: str, sound_id: int, note: str | None) -> str:
    new = dl.failed_ids_text(text, sound_id, note)
    assert new is not None
    return new


def test_failed_ids_text_adds_replaces_and_removes_lines():
    text = _failed_ids("", 5, "md5 mismatch")
    assert text.startswith("# ") and text.endswith("5  # md5 mismatch\n")
    assert dl.parse_id_lines(text.splitlines(), "failed_ids.txt") == [5]   # a valid --ids-file
    text = _failed_ids(text, 7, "not found\non two lines")
    text = _failed_ids(text, 5, "HTTP 503")
    assert dl.parse_id_lines(text.splitlines(), "f") == [7, 5]
    assert "7  # not found on two lines\n" in text and "md5" not in text
    text = _failed_ids(text, 7, None)
    assert dl.parse_id_lines(text.splitlines(), "f") == [5]
    assert dl.failed_ids_text(text, 5, None) is None                         # nothing left: remove the file


def test_plan_groups_new_sounds_by_licence():
    todo = [{"license": "http://creativecommons.org/publicdomain/zero/1.0/", "filesize": 100},
            {"license": "https://creativecommons.org/licenses/by/4.0/", "filesize": 50},
            {"license": "http://creativecommons.org/publicdomain/zero/1.0/", "filesize": 1}]
    summary = dl.plan(dl.Selection(todo, selected=5, present=2, missing=[9]), daily_cap=2, used_now=1)
    assert summary.by_license == {"CC BY 4.0": dl.LicenseRow(1, 50), "CC0 1.0": dl.LicenseRow(2, 101)}
    assert summary.runs == 2 and summary.new_bytes == 151
    assert dl.as_json(summary) == dataclasses.asdict(summary)  # what --json prints
    assert dataclasses.asdict(summary)["by_license"]["CC0 1.0"] == {"sounds": 2, "bytes": 101}
    text = summary.text()
    assert "| CC0 1.0 | 2 | 101 B |" in text and "takes 2 runs" in text and "not found on Freesound: 9" in text


def test_the_loopback_receiver_times_out_with_a_clear_message():
    with dl.LoopbackReceiver("http://127.0.0.1/callback") as receiver:
        assert receiver.redirect_uri.startswith("http://127.0.0.1:")
        with pytest.raises(dl.AuthError, match="no login arrived"):
            receiver.wait(0.05)


def test_the_loopback_receiver_hands_over_the_redirect_query():
    import urllib.request
    with dl.LoopbackReceiver("http://127.0.0.1/cb") as receiver:
        with urllib.request.urlopen(receiver.redirect_uri + "?code=abc&state=s1") as response:
            assert response.status == 200
        assert receiver.wait(1) == {"code": "abc", "state": "s1"}


def test_preview_names_never_collide_with_originals():
    sound = _sound(type="mp3")
    assert dl.sound_filename(sound) == "1234__some-user__my-sound.mp3"
    assert dl.sound_filename(sound, "hq-mp3") == "1234__some-user__my-sound__preview-hq.mp3"
    long_name = dl.sound_filename(_sound(name="n" * 400), "lq-ogg")
    assert long_name.endswith("__preview-lq.ogg") and len(long_name) <= dl.MAX_NAME_BYTES


@pytest.mark.parametrize("previews, expected", [
    ({"preview-hq-mp3": "https://cdn/x-hq.mp3"}, "https://cdn/x-hq.mp3"),   # as the API sends it
    ({"preview_hq_mp3": "https://cdn/y-hq.mp3"}, "https://cdn/y-hq.mp3"),   # as the client rewrites it
    ({}, None),
])
def test_preview_url(previews, expected):
    assert dl.preview_url({"previews": previews}, "hq-mp3") == expected


# -- what an answer means: the whole retry policy -----------------------------------------------

URL = "https://freesound.org/apiv2/sounds/1/download/"
MINUTE_429 = "Request was throttled because of exceeding a request limit rate (60/minute)"
DAY_429 = "Request was throttled because of exceeding a request limit rate (2000/day)"
SUSPENDED_429 = "Request was throttled because the ApiV2 credential has been suspended"
RETRIES, BACKOFF_S, THROTTLE_WAIT_S = 3, 2.0, 12.0


@pytest.mark.parametrize("answer, attempt, step, outcome", [
    # answers to hand back
    (dict(status=200), dict(kind="api"), "RETURN", None),
    (dict(status=206, is_json=False), dict(kind="download"), "RETURN", None),
    (dict(status=416, is_json=False), dict(kind="download"), "RETURN", None),  # the .part is whole
    # answers that are never retried
    (dict(status=200, is_json=False, detail="unexpected text/html"), dict(kind="api"), "RAISE", dl.ApiError),
    (dict(status=416, detail="x"), dict(kind="api"), "RAISE", dl.ApiError),
    (dict(status=302, location="https://evil.example/?t=1"), dict(), "RAISE", "redirect to https://evil.example/"),
    (dict(status=404, detail="Not found"), dict(), "RAISE", dl.NotFound),
    (dict(status=400, detail="Invalid filter"), dict(kind="api"), "RAISE", dl.UsageError),
    (dict(status=403, detail="This resource requires a secure connection (https)"), dict(), "RAISE", dl.UsageError),
    (dict(status=418, detail="teapot"), dict(), "RAISE", dl.ApiError),
    (dict(status=401, detail="Invalid token"), dict(kind="api"), "RAISE", "API key"),
    # OAuth2: refresh once; a token that another worker already replaced is simply sent again
    (dict(status=401, token_rejected=True), dict(bearer=True), "REFRESH", None),
    (dict(status=401, token_rejected=True), dict(bearer=True, refreshed=True), "RAISE", "OAuth2 login"),
    (dict(status=401, token_rejected=True), dict(bearer=True, token_replaced=True), "RESEND", None),
    (dict(status=401, token_rejected=True), dict(bearer=True, token_replaced=True, refreshed=True), "RESEND", None),
    (dict(status=401, token_rejected=True), dict(bearer=True, token_replaced=True, number=4), "RAISE", dl.AuthError),
    (dict(status=401), dict(bearer=True), "RAISE", dl.AuthError),  # not invalid_token: no refresh helps
    # throttling: the real 429 has no Retry-After
    (dict(status=429, detail=DAY_429), dict(), "DAY_LIMIT", "(2000/day)"),
    (dict(status=429, detail=SUSPENDED_429), dict(), "RAISE", dl.AuthError),
    (dict(status=429, detail=MINUTE_429), dict(), "RETRY", THROTTLE_WAIT_S),
    (dict(status=429, detail=MINUTE_429, retry_after_s=7.0), dict(), "RETRY", 7.0),
    (dict(status=429, detail=MINUTE_429, retry_after_s=500.0), dict(), "RETRY", dl.MINUTE_S),
    (dict(status=429, detail=MINUTE_429), dict(number=4), "RAISE", dl.Unavailable),
    # transient failures: backoff, then give up
    (dict(status=0, detail="network error: ConnectionError"), dict(), "RETRY", BACKOFF_S),
    (dict(status=0, detail="network error: ConnectionError"), dict(number=4), "RAISE", dl.NetworkError),
    (dict(status=503, detail="busy"), dict(number=3), "RETRY", BACKOFF_S),
    (dict(status=500, detail="Server error"), dict(number=4), "RAISE", "gave up after 4 tries"),
])
def test_decide(answer, attempt, step, outcome):
    decision = dl.decide(dl.Answer(**answer), dl.Attempt(**{"url": URL, "kind": "download", "number": 1, **attempt}),
                         RETRIES, BACKOFF_S, THROTTLE_WAIT_S)
    assert decision.step is dl.Step[step]
    if isinstance(outcome, float):
        assert decision.delay_s == outcome and decision.note
    elif isinstance(outcome, type):
        assert isinstance(decision.error, outcome), decision.error
    elif isinstance(outcome, str):
        assert outcome in str(decision.error or decision.note)
    else:
        assert decision.error is None and decision.delay_s == 0


def test_a_minute_429_waits_at_least_the_backoff():
    answer = dl.Answer(429, MINUTE_429)
    attempt = dl.Attempt(URL, "api", 1)
    assert dl.decide(answer, attempt, RETRIES, backoff_s=5.0, throttle_wait_s=0.0).delay_s == 5.0
