"""The library over months: metadata.json kept whole by a journal, at any size and any exit."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST, SCRIPT

import download_freesound_library as dl

IDS = ["1000", "1001", "1002", "1003", "1004", "1005"]


def _assert_whole(env) -> list[dict]:
    """metadata.json parses, is sorted, records every audio file on disk, and no journal is left."""
    entries = env.metadata()
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    finals = [n for n in env.audio_files() if not n.endswith(".part")]
    assert sorted(finals) == sorted(e["file"] for e in entries)
    assert not (env.out / dl.Library.JOURNAL_NAME).exists()
    credited = (env.out / "ATTRIBUTION.txt").read_text()
    assert all(f"/s/{i}/" in credited for i in ids)
    return entries


@pytest.mark.parametrize("code, setup, args", [
    (1, lambda fake: setattr(fake.sounds[1003], "moderated", False), []),
    (4, lambda fake: None, ["--daily-cap", "3"]),
    (2, lambda fake: fake.inject(r"/sounds/\d+/download/", 403,
                                 {"detail": "This resource requires a secure connection (https)"}, after=3), []),
])
def test_metadata_json_is_whole_and_sorted_at_every_exit(env, code, setup, args):
    setup(env.fake)
    env.login()
    result = env.run("--ids", *reversed(IDS), "--jobs", "1", *args)
    assert result.returncode == code, result.output
    assert len(_assert_whole(env)) == 3 if code in (2, 4) else 5


def test_after_kill_9_the_journal_keeps_every_record_and_the_next_run_folds_it(env):
    env.login()
    env.fake.download_delay_s = 0.3
    argv = [sys.executable, str(SCRIPT), *FAST, "--jobs", "1", "--ids", *IDS, "--output-dir", str(env.out)]
    proc = subprocess.Popen(argv, env=env.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    journal = env.out / dl.Library.JOURNAL_NAME
    while (not journal.exists() or journal.read_text().count("\n") < 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    recorded = [json.loads(line)["id"] for line in journal.read_text().splitlines()]
    assert len(recorded) >= 3 and not (env.out / "metadata.json").exists()  # not folded: killed
    env.fake.download_delay_s = 0
    dry = env.run("--ids", *IDS, "--dry-run")  # a dry run reads the journal as well
    assert f"{len(recorded)} already present" in dry.stdout, dry.output
    downloads_before = len(env.fake.downloads())
    result = env.run("--ids", *IDS)
    assert result.returncode == 0, result.output
    assert len(env.fake.downloads()) - downloads_before <= len(IDS) - len(recorded)  # none fetched twice
    assert [e["id"] for e in _assert_whole(env)] == list(map(int, IDS))


def test_a_record_after_a_torn_journal_line_stays_a_line_of_its_own(tmp_path):
    journal = tmp_path / "journal.jsonl"
    journal.write_bytes(b'{"id": 1}\n{"id": 2, "na')  # killed mid-append
    dl.end_torn_line(journal)
    with journal.open("ab") as handle:
        handle.write(b'{"id": 3}\n')
    with journal.open("rb") as lines:
        assert sorted(dl.journal_updates(lines)) == [1, 3]


def test_the_journal_is_folded_at_least_every_thirty_seconds(tmp_path, monkeypatch):
    library = dl.Library(tmp_path)
    clock = [1000.0]
    monkeypatch.setattr(dl.time, "monotonic", lambda: clock[0])
    sound = {"id": 5, "name": "a.wav", "username": "u", "license": "", "filesize": 1, "md5": "0" * 32}
    with library.locked(wait=False, ui=dl.Ui(quiet=True)):
        library._folded_at = clock[0]
        library.record(sound, "5__u__a.wav", time.time())
        assert not (tmp_path / "metadata.json").exists()  # journaled only
        clock[0] += dl.Library.FOLD_EVERY_S
        library.record({**sound, "id": 6}, "6__u__a.wav", time.time())
        assert [e["id"] for e in json.loads((tmp_path / "metadata.json").read_text())] == [5, 6]
        assert not (tmp_path / dl.Library.JOURNAL_NAME).exists()


def test_a_metadata_json_in_another_layout_is_read_and_rewritten_sorted(env):
    env.login()
    assert env.run("--ids", "1004", "1001").returncode == 0
    entries = env.metadata()
    (env.out / "metadata.json").write_text(json.dumps(list(reversed(entries)), indent=4))  # a teammate's editor
    result = env.run("--ids", "1004", "1001", "1002")
    assert result.returncode == 0, result.output
    assert len(env.fake.downloads()) == 3  # 1004 and 1001 were known in that layout too
    assert [e["id"] for e in _assert_whole(env)] == [1001, 1002, 1004]
    assert (env.out / "metadata.json").read_text().splitlines()[1].startswith('  {"')  # our layout again


# -- secrets out of crontabs ----------------------------------------------------------------------

NO_SECRETS = {"FREESOUND_CLIENT_ID": "", "FREESOUND_CLIENT_SECRET": ""}


def test_login_stores_the_credentials_so_later_runs_need_none_and_logout_forgets_them(env):
    result = env.run("--login", "--auth-code", env.fake.issue_code())
    assert result.returncode == 0, result.output
    stored = env.state / "credentials.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert json.loads(stored.read_text()) == {"client_id": env.fake.client_id, "client_secret": env.fake.client_secret}
    result = env.run("--ids", "1000", env=NO_SECRETS)  # as from cron: nothing in the environment
    assert result.returncode == 0, result.output
    assert [e["id"] for e in env.metadata()] == [1000]
    result = env.run("--logout", env=NO_SECRETS)
    assert result.returncode == 0, result.output
    assert not stored.exists() and not (env.state / "token.json").exists()
    result = env.run("--ids", "1001", env=NO_SECRETS)
    assert result.returncode == 3 and "FREESOUND_CLIENT_ID" in result.stderr, result.output


def test_the_environment_and_flags_override_stored_credentials(env):
    assert env.run("--login", "--auth-code", env.fake.issue_code()).returncode == 0
    stored = env.state / "credentials.json"
    stored.write_text(json.dumps({"client_id": env.fake.client_id, "client_secret": "stale-secret"}))
    result = env.run("--query", "rain", "--dry-run")  # the environment's secret is the right one
    assert result.returncode == 0, result.output
    result = env.run("--query", "rain", "--dry-run", env={"FREESOUND_CLIENT_SECRET": ""})
    assert result.returncode == 3 and "FREESOUND_CLIENT_SECRET" in result.stderr, result.output


@pytest.mark.parametrize("args", [["--logout", "--query", "a"], ["--logout", "--login"]])
def test_logout_takes_nothing_else(env, run_main, args):
    result = run_main(*args)
    assert result.returncode == 2 and "--logout takes no source" in result.stderr


# -- reproduce a library from its metadata ------------------------------------------------------------

def test_a_teammates_metadata_json_reproduces_the_library(env, tmp_path):
    env.login()
    assert env.run("--ids", "1000", "1002", "1004").returncode == 0
    shared = tmp_path / "teammate-metadata.json"
    shared.write_bytes((env.out / "metadata.json").read_bytes())  # committed to git without the audio
    clone = tmp_path / "clone"
    result = env.run("--ids-file", str(shared), "--output-dir", str(clone))
    assert result.returncode == 0, result.output
    assert sorted(p.name for p in clone.iterdir() if p.suffix in (".wav", ".flac", ".aiff")) == \
        sorted(env.fake.sounds[i].friendly_filename() for i in (1000, 1002, 1004))
    assert [e["id"] for e in json.loads((clone / "metadata.json").read_text())] == [1000, 1002, 1004]


def test_a_sound_whose_original_changed_is_not_downloaded_unless_accepted(env, tmp_path):
    env.login()
    assert env.run("--ids", "1000", "1002").returncode == 0
    shared = tmp_path / "metadata.json"
    shared.write_bytes((env.out / "metadata.json").read_bytes())
    downloaded_at = {e["id"]: e["downloaded_at"] for e in env.metadata()}
    env.fake.sounds[1002].data = b"a re-uploaded original"
    env.fake.sounds[1002]._md5 = None
    clone = tmp_path / "clone"
    result = env.run("--ids-file", str(shared), "--output-dir", str(clone), "--json")
    assert result.returncode == 1, result.output
    assert f"sound 1002: changed on Freesound since {downloaded_at[1002]}" in result.stderr
    assert json.loads(result.stdout)["changed"] == [{"id": 1002, "since": downloaded_at[1002]}]
    assert [e["id"] for e in json.loads((clone / "metadata.json").read_text())] == [1000]
    dry = env.run("--ids-file", str(shared), "--output-dir", str(clone), "--dry-run")
    assert "sound 1002: changed on Freesound since" in dry.stdout
    result = env.run("--ids-file", str(shared), "--output-dir", str(clone), "--accept-changed")
    assert result.returncode == 0, result.output
    assert (clone / env.fake.sounds[1002].friendly_filename()).read_bytes() == b"a re-uploaded original"


@pytest.mark.parametrize("text, message", [
    ('[{"name": "no id"}]', "ids.json is not valid metadata (expected a JSON array of objects with an 'id')"),
    ('[{"id": "x1"}]', "not a Freesound sound ID: 'x1'"),
    ('[1, 2]', "ids.json is not valid metadata"),
    ('[{"id": 1}', "ids.json is not valid metadata"),
])
def test_a_json_ids_file_that_is_not_a_metadata_json_is_a_usage_error(env, run_main, tmp_path, text, message):
    (tmp_path / "ids.json").write_text(text)
    result = run_main("--ids-file", str(tmp_path / "ids.json"))
    assert result.returncode == 2 and message in result.stderr, result.output


# -- prune, and stay pruned -------------------------------------------------------------------------

def test_exclude_removes_files_and_entries_and_no_source_selects_them_again(env):
    env.login()
    assert env.run("--query", "", "--sidecars").returncode == 0
    before = len(env.fake.downloads())
    gone = env.fake.sounds[1003].friendly_filename()
    result = env.run("--exclude", "1003", "https://freesound.org/s/1005/", env=NO_SECRETS)
    assert result.returncode == 0, result.output
    assert len(env.fake.requests) == len(env.fake.requests_to(".")) and len(env.fake.downloads()) == before
    assert not (env.out / gone).exists() and not (env.out / f"{gone}.json").exists()
    assert 1003 not in [e["id"] for e in _assert_whole(env)]
    assert dl.parse_id_lines((env.out / "excluded_ids.txt").read_text().splitlines(), "x") == [1003, 1005]
    assert "1003" not in (env.out / "ATTRIBUTION.txt").read_text().replace("/s/1003/", "")
    for source in (["--query", ""], ["--ids", "1003", "1005"], ["--ids-file", str(env.out / "metadata.json")]):
        result = env.run(*source)
        assert result.returncode == 0, result.output
    assert len(env.fake.downloads()) == before  # never selected again
    dry = env.run("--ids", "1003", "1005", "1000", "--dry-run")
    assert "left out: 2 sounds in excluded_ids.txt" in dry.stdout


def test_a_file_deleted_by_hand_is_downloaded_again_as_a_repair(env):
    env.login()
    assert env.run("--ids", "1000", "1001").returncode == 0
    (env.out / env.fake.sounds[1001].friendly_filename()).unlink()
    result = env.run("--ids", "1000", "1001")
    assert result.returncode == 0, result.output
    assert [d["path"] for d in env.fake.downloads()][-1] == "/apiv2/sounds/1001/download/"


def test_exclude_is_an_action_of_its_own(env, run_main):
    result = run_main("--exclude", "1000", "--query", "rain")
    assert result.returncode == 2 and "action of its own" in result.stderr


# -- audit ---------------------------------------------------------------------------------------------

def test_audit_reports_every_kind_of_change_notes_it_in_metadata_and_repairs_on_request(env):
    env.login()
    assert env.run("--ids", "1000", "1001", "1002", "1003", "1004", "1005").returncode == 0
    recorded = {e["id"]: e for e in env.metadata()}
    fake = env.fake
    del fake.sounds[1000]                                  # gone from Freesound
    fake.sounds[1001].license = "Attribution NonCommercial"  # licence changed (was Attribution)
    fake.sounds[1002].gen_ai_preference = "no-gen-ai"        # AI preference changed
    fake.sounds[1003].data, fake.sounds[1003]._md5 = b"new take", None  # original replaced
    (env.out / recorded[1004]["file"]).unlink()              # local file missing
    (env.out / recorded[1005]["file"]).write_bytes(b"x" * recorded[1005]["filesize"])  # damaged, same size
    before = len(fake.requests)
    result = env.run("--audit", "--json", env={"FREESOUND_STATE_DIR": str(env.state.parent / "no-login")})
    assert result.returncode == 1, result.output
    assert len(fake.requests) - before == 1  # one search for six sounds, with the API key alone
    kinds = {(f["sound_id"], f["kind"]) for f in json.loads(result.stdout)["findings"]}
    assert kinds == {(1000, "gone"), (1001, "license"), (1002, "gen_ai_preference"), (1003, "replaced"),
                     (1004, "missing"), (1005, "damaged")}
    licence = [f for f in json.loads(result.stdout)["findings"] if f["kind"] == "license"][0]
    assert (licence["recorded"], licence["now"]) == ("CC BY 4.0", "CC BY-NC 4.0")
    entries = {e["id"]: e for e in env.metadata()}
    assert entries[1001]["license"] == recorded[1001]["license"]  # the grant the user holds
    assert entries[1001]["current"]["license"].endswith("/by-nc/4.0/")
    assert entries[1000]["current"] == {"gone_from_freesound": True} and entries[1004]["current"] == {}
    assert all("audited_at" in e for e in entries.values())
    text = env.run("--audit")
    assert text.returncode == 1 and "sound 1001: licence changed: CC BY 4.0 -> CC BY-NC 4.0" in text.stdout
    downloads = len(fake.downloads())
    repaired = env.run("--audit", "--repair", "--json")
    assert repaired.returncode == 1, repaired.output  # gone, licence, preference, replaced remain
    assert sorted(json.loads(repaired.stdout)["repaired"]) == [1004, 1005]
    assert len(fake.downloads()) - downloads == 2
    for sound_id in (1004, 1005):
        assert (env.out / recorded[sound_id]["file"]).read_bytes() == fake.sounds[sound_id].data


def test_a_clean_library_audits_clean(env):
    env.login()
    assert env.run("--ids", "1000", "1001").returncode == 0
    result = env.run("--audit")
    assert result.returncode == 0, result.output
    assert "audited 2 sounds: 0 findings" in result.stdout


def test_audit_costs_one_request_per_150_sounds(env):
    from fake_freesound import make_sounds
    env.fake.add(*make_sounds(160, start_id=5000, size=16))
    env.login()
    assert env.run("--ids", *map(str, range(5000, 5160))).returncode == 0
    before = len(env.fake.requests)
    assert env.run("--audit").returncode == 0
    assert len(env.fake.requests) - before == 2


# -- a library defined in a file ------------------------------------------------------------------------

LIBRARY_TOML = '''
[[collection]]
name = "cc0-wind"
query = "wind"
license = ["cc0"]

[[collection]]
name = "hand-picked"
ids_file = "picked.txt"   # relative to this file's folder

[[collection]]
name = "loops"
query = ""
filter = "ac_loop:true"
bpm = "80-100"
max = 2
sort = "bpm:90"
'''


def _library_file(tmp_path, text: str = LIBRARY_TOML):
    folder = tmp_path / "library"
    folder.mkdir(exist_ok=True)
    (folder / "picked.txt").write_text("1001  # the good one\nhttps://freesound.org/s/1003/\n")
    (folder / "library.toml").write_text(text)
    return folder / "library.toml"


def _expected(env) -> dict[str, list[int]]:
    sounds = env.fake.sounds.values()
    wind = sorted(s.id for s in sounds if "wind" in s.tags and s.license == "Creative Commons 0")
    loops = sorted((s for s in sounds if s.descriptors["loopable"] and 80 <= s.descriptors["bpm"] <= 100),
                   key=lambda s: (abs(s.descriptors["bpm"] - 90), s.id))[:2]
    return {"cc0-wind": wind, "hand-picked": [1001, 1003], "loops": sorted(s.id for s in loops)}


def test_a_library_file_fills_each_collection_in_its_own_folder(env, tmp_path):
    env.login()
    result = env.run("--library", str(_library_file(tmp_path)), "--json")
    assert result.returncode == 0, result.output
    for name, ids in _expected(env).items():
        assert ids and [e["id"] for e in json.loads((env.out / name / "metadata.json").read_text())] == ids
    assert "note: ac_loop is now called loopable" in result.stderr
    assert set(json.loads(result.stdout)["collections"]) == {"cc0-wind", "hand-picked", "loops"}
    again = env.run("--library", str(_library_file(tmp_path)))
    assert again.returncode == 0 and len(env.fake.downloads()) == sum(map(len, _expected(env).values()))


def test_a_library_dry_run_has_a_row_per_collection_and_the_days_all_of_it_needs(env, tmp_path):
    result = env.run("--library", str(_library_file(tmp_path)), "--dry-run", "--daily-cap", "3")
    assert result.returncode == 0, result.output
    expected = _expected(env)
    for name, ids in expected.items():
        assert f"| {name} | " in result.stdout and f" | {len(ids)} | " in result.stdout
    total = sum(map(len, expected.values()))
    assert f"the whole library takes {-(-total // 3)} runs" in result.stdout
    assert not env.fake.downloads()


def test_a_library_run_stops_at_the_daily_cap_and_leaves_the_rest_for_tomorrow(env, tmp_path):
    env.login()
    wind = len(_expected(env)["cc0-wind"])
    result = env.run("--library", str(_library_file(tmp_path)), "--daily-cap", str(wind + 1))
    assert result.returncode == 4, result.output
    assert "not started (daily limit): loops" in result.stderr
    assert len(env.fake.downloads()) == wind + 1


def test_failures_in_one_collection_make_the_run_exit_1(env, tmp_path):
    env.fake.sounds[1003].moderated = False
    env.login()
    result = env.run("--library", str(_library_file(tmp_path)))
    assert result.returncode == 1, result.output
    assert (env.out / "loops" / "metadata.json").exists()  # the others still ran


@pytest.mark.parametrize("text, message", [
    ('[[collection]]\nname = "a"\nquery = "x"\nlicence = ["cc0"]\n', "collection 'a': unknown key 'licence'"),
    ('[[collection]]\nname = "a"\n', "collection 'a': needs exactly one source key"),
    ('[[collection]]\nname = "a"\nquery = "x"\npack = 3\n', "collection 'a': needs exactly one source key"),
    ('[[collection]]\nname = "a"\nquery = "x"\n[[collection]]\nname = "a"\nuser = "u"\n',
     "collection 'a': a second collection with this name"),
    ('[[collection]]\nquery = "x"\n', "collection 1: needs a name"),
    ('[[collection]]\nname = "a"\npack = 3\nlicense = "cc0"\n', "collection 'a': --filter and the filter helpers"),
    ('[[collection]]\nname = "a"\nquery = "x"\nlicense = "cc9"\n', "collection 'a': argument --license"),
    ('[[collection]]\nname = "a"\nquery = "x"\nbpm = "fast"\n', "collection 'a': --bpm"),
    ('name = "a"\n', "expected [[collection]] tables"),
    ('[[collection]\n', "cannot read --library"),
])
def test_library_file_mistakes_are_exit_2_naming_the_file_collection_and_key(env, run_main, tmp_path, text, message):
    path = _library_file(tmp_path, text)
    result = run_main("--library", str(path))
    assert result.returncode == 2, result.output
    assert message in result.stderr and str(path) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not env.fake.requests
