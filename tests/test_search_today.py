"""Freesound's search as it is today: descriptor filters and their old `ac_` names, the
parenthesis trap, the Broad Sound Taxonomy, similar sounds, generative-AI preferences and
sorting by closeness. Pure compilers first, then the real script against the fake."""
from __future__ import annotations

import json
import math

import pytest
from fake_freesound import GEN_AI_PREFERENCES, FakeSound, FilterError, compile_filter

import download_freesound_library as dl

# -- the fake follows the server: suffixes only on tokens that start with a descriptor ----------


def test_the_fake_rejects_a_descriptor_right_after_a_parenthesis_or_a_sign():
    sound = FakeSound(1, "a", "u", descriptors={"bpm": 120.0, "loopable": True})
    for trap in ("(bpm:120 OR bpm:121)", "-loopable:true", "ac_tempo:[118 TO 122]"):
        with pytest.raises(FilterError, match="undefined field"):
            compile_filter(trap)
    assert compile_filter("( bpm:120 OR bpm:121 )")(sound)
    assert compile_filter("bpm:[118 TO 122] loopable:true")(sound)
    assert not compile_filter("bpm:[118 TO 122] loopable:false")(sound)
    assert compile_filter('license:("Attribution" OR "Creative Commons 0") bpm:120')(sound)


# -- compiling the helpers -------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, expected", [
    ("--bpm", "118-122", "bpm:[118 TO 122]"),
    ("--bpm", "120-", "bpm:[120 TO *]"),
    ("--bpm", "-90", "bpm:[* TO 90]"),
    ("--bpm", "120", "bpm:120"),
    ("--bpm", "99.5-100.5", "bpm:[99.5 TO 100.5]"),
    ("--note", "a4", 'note_name:"A4"'),
    ("--note", "Bb2", 'note_name:"A#2"'),
    ("--tonality", "c# MINOR", 'tonality:"C# minor"'),
    ("--descriptor", "brightness=70-100", "brightness:[70 TO 100]"),
    ("--descriptor", "reverbness=False", "reverbness:false"),
    ("--descriptor", "loudness=-30--10", "loudness:[-30 TO -10]"),
    ("--descriptor", "note_midi=60", "note_midi:60"),
    ("--descriptor", "fsdsinet_detected_class=Rain", 'fsdsinet_detected_class:"Rain"'),
])
def test_descriptor_helpers_compile_to_todays_names(run_main, flag, value, expected):
    result = run_main("--print-filter", flag, value)
    assert result.returncode == 0, result.output
    assert result.stdout == expected + "\n"


def test_loop_and_single_event_and_friends_are_anded_with_the_filter(run_main):
    result = run_main("--print-filter", "-f", "bpm:120 OR bpm:121", "--loop", "--single-event",
                      "--category", "instrument SAMPLES", "--gen-ai-use", "proprietary")
    assert result.returncode == 0, result.output
    assert result.stdout == ('( bpm:120 OR bpm:121 ) loopable:true single_event:true '
                             'category:"Instrument samples" gen_ai_preference:("no-additional-preferences")\n')


@pytest.mark.parametrize("text, expected", [
    ("(bpm:1 OR bpm:2)", "( bpm:1 OR bpm:2 )"),
    ("((bpm:1 OR bpm:2) AND tag:x)", "(( bpm:1 OR bpm:2 ) AND tag:x)"),
    ("( loopable:true )", "( loopable:true )"),
    ('(category:"Music" OR subcategory:"Nature")', '( category:"Music" OR subcategory:"Nature" )'),
    ('license:("Attribution" OR "Creative Commons 0")', 'license:("Attribution" OR "Creative Commons 0")'),
    ("(tag:a OR tag:b)", "(tag:a OR tag:b)"),
    ('description:"(bpm:1)"', 'description:"(bpm:1)"'),
])
def test_no_descriptor_is_left_directly_after_a_parenthesis(text, expected):
    assert dl.pad_descriptor_groups(text) == expected
    assert dl.pad_descriptor_groups(expected) == expected


def test_old_ac_names_are_rewritten_with_one_note_each_and_quoted_text_is_left_alone():
    text, notes = dl.modernize_filter('ac_tempo:[118 TO 122] ac_loop:true ac_tempo_confidence:[0.8 TO *] '
                                      'description:"ac_tempo:1"')
    assert text == 'bpm:[118 TO 122] loopable:true bpm_confidence:[0.8 TO *] description:"ac_tempo:1"'
    assert notes == ["note: ac_tempo is now called bpm", "note: ac_loop is now called loopable",
                     "note: ac_tempo_confidence is now called bpm_confidence"]


def test_every_old_name_maps_to_a_descriptor_that_exists_today():
    assert all(new in dl.DESCRIPTORS for new in dl.AC_RENAMES.values())
    assert dl.AC_RENAMES["ac_reverb"] == "reverbness" and dl.AC_RENAMES["ac_note_name"] == "note_name"


@pytest.mark.parametrize("args, message", [
    (["--descriptor", "brightnes=70"], "did you mean brightness"),
    (["--descriptor", "tempo=120"], "did you mean bpm"),
    (["--descriptor", "brightness=70-101"], "101 is outside brightness's range (0 to 100)"),
    (["--descriptor", "bpm_confidence=2"], "outside bpm_confidence's range (0 to 1)"),
    (["--descriptor", "note_midi=60.5"], "whole numbers"),
    (["--descriptor", "reverbness=maybe"], "true or false"),
    (["--descriptor", "mfcc=1"], "cannot be used in filters"),
    (["--descriptor", "brightness"], "NAME=VALUE"),
    (["--descriptor", "ac_note_frequency=440"], "use pitch"),
    (["--bpm", "130-120"], "empty range"),
    (["--bpm", "fast"], "'fast'"),
    (["--bpm=-5-10"], "outside bpm's range"),
    (["--note", "H2"], "'H2'"),
    (["--tonality", "C dorian"], "'C dorian'"),
    (["--filter", "ac_note_frequency:[400 TO 500]"], "no successor; use pitch"),
    (["--filter", "ac_bogus:1"], "unknown descriptor 'ac_bogus'"),
    (["--filter=-loopable:true"], "loopable:false rather than -loopable:true"),
    (["--category", "musik"], "one of: Music, Instrument samples, Speech, Sound effects, Soundscapes"),
    (["--subcategory", "other"], "add --category"),
    (["--category", "music", "--subcategory", "animals"], "valid: Music: Solo percussion"),
    (["--subcategory", "birds"], "Sound effects: Objects / House appliances"),
    (["--sort", "ac_bogus:1"], "unknown descriptor"),
    (["--sort", "loopable:1"], "numeric descriptors"),
    (["--sort", "brightness:120"], "outside brightness's range"),
    (["--gen-ai-use", "commercial"], "invalid choice"),
    (["--similarity-space", "laion_clap"], "goes with --similar-to"),
])
def test_bad_search_options_are_usage_errors_naming_what_is_valid(env, run_main, args, message):
    result = run_main("--query", "", *args)
    assert result.returncode == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not env.fake.requests


@pytest.mark.parametrize("category, subcategory, expected", [
    ("SOUND effects", None, ['category:"Sound effects"']),
    (None, "animals", ['category:"Sound effects"', 'subcategory:"Animals"']),
    ("soundscapes", "other", ['category:"Soundscapes"', 'subcategory:"Other"']),
    (None, "other mechanisms,  engines, machines", ['category:"Sound effects"',
                                                     'subcategory:"Other mechanisms, engines, machines"']),
    (None, "piano/keyboard instruments", ['category:"Instrument samples"',
                                           'subcategory:"Piano / Keyboard instruments"']),
])
def test_taxonomy_names_are_matched_in_any_case_and_sent_exactly(category, subcategory, expected):
    assert dl.taxonomy_clauses(category, subcategory) == expected


@pytest.mark.parametrize("use, allowed", [
    ("proprietary", {"no-additional-preferences"}),
    ("open-source", {"no-additional-preferences", "open-source-models"}),
    ("open-source-noncommercial", {"no-additional-preferences", "open-source-models",
                                   "noncommercial-open-source-models"}),
])
def test_gen_ai_use_selects_the_preferences_of_the_issue_table_and_never_no_gen_ai(use, allowed):
    predicate = compile_filter(dl.gen_ai_clause(use))
    selected = {p for p in GEN_AI_PREFERENCES if predicate(FakeSound(1, "a", "u", gen_ai_preference=p))}
    assert selected == allowed


def test_sort_by_closeness_accepts_descriptor_targets_and_old_names():
    assert dl.sort_option("downloads_desc") == ("downloads_desc", [])
    assert dl.sort_option("bpm:120, brightness:80.0") == ("bpm:120,brightness:80", [])
    assert dl.sort_option("ac_tempo:120") == ("bpm:120", ["note: ac_tempo is now called bpm"])


def test_the_dry_run_plan_counts_new_sounds_by_gen_ai_preference():
    todo = [{"gen_ai_preference": "no-gen-ai"}, {"gen_ai_preference": "no-additional-preferences"},
            {"gen_ai_preference": "no-gen-ai"}, {}]
    summary = dl.plan(dl.Selection(todo, selected=4, present=0, missing=[]), daily_cap=10, used_now=0)
    assert summary.by_gen_ai_preference == {"no-additional-preferences": 1, "no-gen-ai": 2, "not stated": 1}
    assert "| no-gen-ai | 2 |" in summary.text()


# -- against the fake -------------------------------------------------------------------------------

def _ids(env, predicate) -> list[int]:
    return sorted(s.id for s in env.fake.sounds.values() if predicate(s))


def test_descriptor_helpers_select_what_they_say(env):
    env.login()
    result = env.run("--query", "", "--bpm", "100-130", "--loop")
    assert result.returncode == 0, result.output
    expected = _ids(env, lambda s: 100 <= s.descriptors["bpm"] <= 130 and s.descriptors["loopable"])
    assert expected and [e["id"] for e in env.metadata()] == expected
    assert env.fake.requests_to("/search/")[0]["query"]["filter"] == "bpm:[100 TO 130] loopable:true"


def test_an_old_ac_filter_is_rewritten_with_a_note_and_works(env):
    env.login()
    result = env.run("--query", "", "--filter", "ac_tempo:[100 TO 130] ac_loop:true")
    assert result.returncode == 0, result.output
    assert "note: ac_tempo is now called bpm" in result.stderr
    assert "note: ac_loop is now called loopable" in result.stderr
    expected = _ids(env, lambda s: 100 <= s.descriptors["bpm"] <= 130 and s.descriptors["loopable"])
    assert [e["id"] for e in env.metadata()] == expected


def test_a_grouped_descriptor_filter_survives_the_parenthesis_trap(env):
    env.login()
    result = env.run("--query", "", "--filter", "(bpm:80 OR bpm:90)", "--license", "cc0")
    assert result.returncode == 0, result.output
    expected = _ids(env, lambda s: s.descriptors["bpm"] in (80, 90) and s.license == "Creative Commons 0")
    assert expected and [e["id"] for e in env.metadata()] == expected


def test_a_subcategory_brings_its_category_and_selects_only_it(env):
    env.login()
    result = env.run("--query", "", "--subcategory", "ANIMALS")
    assert result.returncode == 0, result.output
    expected = _ids(env, lambda s: (s.category, s.subcategory) == ("Sound effects", "Animals"))
    assert expected and [e["id"] for e in env.metadata()] == expected
    assert {e["category"] for e in env.metadata()} == {"Sound effects"}


def test_metadata_records_each_sounds_gen_ai_preference_and_the_flag_selects_by_it(env):
    env.login()
    result = env.run("--query", "", "--gen-ai-use", "open-source")
    assert result.returncode == 0, result.output
    allowed = {"no-additional-preferences", "open-source-models"}
    assert [e["id"] for e in env.metadata()] == _ids(env, lambda s: s.gen_ai_preference in allowed)
    assert {e["gen_ai_preference"] for e in env.metadata()} == allowed
    result = env.run("--ids", "1003")  # a no-gen-ai sound, named by id: recorded as such
    assert result.returncode == 0, result.output
    assert [e["gen_ai_preference"] for e in env.metadata() if e["id"] == 1003] == ["no-gen-ai"]


def test_the_dry_run_shows_a_table_of_gen_ai_preferences(env):
    result = env.run("--query", "", "--dry-run", "--json")
    assert result.returncode == 0, result.output
    counts = json.loads(result.stdout)["by_gen_ai_preference"]
    expected: dict[str, int] = {}
    for sound in env.fake.sounds.values():
        expected[sound.gen_ai_preference] = expected.get(sound.gen_ai_preference, 0) + 1
    assert counts == expected
    text = env.run("--query", "", "--dry-run").stdout
    rows = [line.split(" | ")[0].strip("| ") for line in text.splitlines() if line.startswith("| no") or
            line.startswith("| open") or line.startswith("| noncommercial")]
    assert rows == [p for p in GEN_AI_PREFERENCES if p in expected]  # most permissive first
    assert "| generative-AI preference" in text and f"| no-gen-ai | {expected['no-gen-ai']} |" in text


def test_similar_to_searches_with_the_filter_and_the_space(env):
    for sound in env.fake.sounds.values():  # 1000 is the target; 1001-1004 point its way
        angle = 0.0 if sound.id <= 1004 else math.pi / 2
        sound.vectors = {"freesound_classic": (math.cos(angle + (sound.id - 1000) * 0.1), math.sin(angle))}
    env.login()
    result = env.run("--similar-to", "https://freesound.org/s/1000/", "--similarity-space", "freesound_classic",
                     "--license", "cc0", "--license", "by")
    assert result.returncode == 0, result.output
    search = env.fake.requests_to("/search/")[0]["query"]
    assert search["similar_to"] == "1000" and search["similarity_space"] == "freesound_classic"
    expected = [i for i in (1001, 1002, 1003, 1004)
                if env.fake.sounds[i].license in ("Creative Commons 0", "Attribution")]
    assert expected and [e["id"] for e in env.metadata()] == expected


def test_similar_to_is_a_source_of_its_own(env, run_main):
    result = run_main("--similar-to", "1000", "--query", "rain")
    assert result.returncode == 2 and "not allowed with" in result.stderr
    result = run_main("--similar-to", "not-a-sound")
    assert result.returncode == 2 and "'not-a-sound'" in result.stderr


def test_sort_by_closeness_downloads_the_closest_first(env):
    env.login()
    result = env.run("--query", "", "--sort", "bpm:100,brightness:50", "--max", "2", "--jobs", "1")
    assert result.returncode == 0, result.output
    assert env.fake.requests_to("/search/")[0]["query"]["sort"] == "bpm:100,brightness:50"

    def distance(sound: FakeSound) -> tuple[float, int]:
        return math.dist((sound.descriptors["bpm"], sound.descriptors["brightness"]), (100, 50)), sound.id
    closest = sorted(env.fake.sounds.values(), key=distance)[:2]
    assert [d["path"] for d in env.fake.downloads()] == [f"/apiv2/sounds/{s.id}/download/" for s in closest]


# -- a whole pack in one request ------------------------------------------------------------------

PACK = 77
PACK_IDS = [1001, 1002, 1003, 1004, 1005]


def _make_pack(env) -> None:
    for sound_id in PACK_IDS:
        env.fake.sounds[sound_id].pack_id = PACK
        env.fake.sounds[sound_id].pack_name = "Rain pack"


def _assert_library_is_the_pack(env) -> None:
    assert [e["id"] for e in env.metadata()] == PACK_IDS
    for entry in env.metadata():
        assert (env.out / entry["file"]).read_bytes() == env.fake.sounds[entry["id"]].data
        assert entry["md5"] == env.fake.sounds[entry["id"]].md5
    credited = (env.out / "ATTRIBUTION.txt").read_text()
    assert all(f"/s/{i}/" in credited for i in PACK_IDS)
    assert not [p.name for p in env.out.iterdir() if ".zip" in p.name or p.name.endswith(".part")]


def test_a_whole_new_pack_comes_as_one_zip_and_each_sound_counts_as_a_download(env):
    _make_pack(env)
    env.login()
    result = env.run("--pack", str(PACK), "--daily-cap", "5", "--api-daily-cap", "3")
    assert result.returncode == 0, result.output
    assert len(env.fake.requests_to(f"/packs/{PACK}/download/")) == 1 and not env.fake.downloads()
    _assert_library_is_the_pack(env)
    kinds = [row["kind"] for row in env.ledger()]
    assert kinds.count("pack") == 1 and sorted(r["sound_id"] for r in env.ledger() if r["kind"] == "pack-member") \
        == PACK_IDS
    state = json.loads(env.run("--status", "--json").stdout)["window"]
    assert state["downloads_used"] == 5 and state["requests_used"] == 2  # the listing and the zip
    result = env.run("--ids", "1000", "--daily-cap", "5")  # the five sounds filled the daily cap
    assert result.returncode == 4, result.output


def test_a_member_that_fails_verification_is_fetched_alone(env):
    _make_pack(env)
    env.fake.corrupt_members.add(1003)
    env.login()
    result = env.run("--pack", str(PACK))
    assert result.returncode == 0, result.output
    assert [d["path"] for d in env.fake.downloads()] == ["/apiv2/sounds/1003/download/"]
    assert "sound 1003: md5 mismatch" in result.stderr
    _assert_library_is_the_pack(env)


def test_a_zip_cut_short_is_resumed_with_range_and_its_sounds_count_once(env):
    _make_pack(env)
    for sound_id in PACK_IDS:  # big enough for whole 1 MiB chunks to land before the cut
        env.fake.sounds[sound_id].data = bytes([sound_id % 251]) * 700_000
    env.fake.pack_drop_after[PACK] = 2_500_000
    env.login()
    result = env.run("--pack", str(PACK))
    assert result.returncode == 0, result.output
    zips = env.fake.requests_to(f"/packs/{PACK}/download/")
    assert [z["headers"].get("Range") for z in zips] == [None, f"bytes={2 * 1024 * 1024}-"]
    assert not env.fake.downloads()
    _assert_library_is_the_pack(env)
    assert sum(1 for row in env.ledger() if row["kind"] == "pack-member") == len(PACK_IDS)


def test_a_zip_left_by_an_interrupted_run_is_resumed_by_the_next(env):
    _make_pack(env)
    env.out.mkdir()
    (env.out / f".pack-{PACK}.zip.part").write_bytes(env.fake.pack_zip(PACK)[:3000])
    env.login()
    result = env.run("--pack", str(PACK))
    assert result.returncode == 0, result.output
    assert [z["headers"].get("Range") for z in env.fake.requests_to(f"/packs/{PACK}/download/")] == ["bytes=3000-"]
    _assert_library_is_the_pack(env)


@pytest.mark.parametrize("args, present", [
    (["--max", "4"], []),               # --max cuts the pack
    (["--daily-cap", "4"], []),         # the pack does not fit in the daily window
    ([], [1002]),                       # not all of it is new
    (["--previews"], []),               # the zip holds originals
])
def test_a_pack_that_is_not_wanted_whole_or_does_not_fit_goes_sound_by_sound(env, args, present):
    _make_pack(env)
    env.login()
    if present:
        assert env.run("--ids", *map(str, present)).returncode == 0
    result = env.run("--pack", str(PACK), *args)
    assert result.returncode in (0, 4), result.output
    assert not env.fake.requests_to(f"/packs/{PACK}/download/")
    assert len(env.fake.downloads()) + len(env.fake.requests_to("/previews/")) >= 4 - len(present)
