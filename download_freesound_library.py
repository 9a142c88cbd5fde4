#!/usr/bin/env -S uv run --script
# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "freesound-api==1.1.0.2",
#     "oauthlib==3.3.1",
#     "requests==2.32.5",
#     "requests-oauthlib==2.0.0",
#     "tqdm==4.67.1",
# ]
# ///
"""Download original sounds from Freesound.org, politely, resumably, with credits.

Finds sounds by a text query and Solr filter, or by a list of IDs/URLs, logs in
with OAuth2 (originals need it), downloads each original under a start-to-start
throttle and a rolling daily cap, verifies size and md5, and keeps metadata.json
and ATTRIBUTION.txt beside the audio. Re-run it (e.g. daily from cron) and it
carries on where it stopped, never downloading a sound twice.

Examples:
    download_freesound_library.py -q "rain" -f 'license:"Creative Commons 0" duration:[1 TO 30]'
    download_freesound_library.py --ids-file my_ids.txt --max 100
    download_freesound_library.py -q drums --bpm 118-122 --loop --license cc0
    download_freesound_library.py --similar-to https://freesound.org/s/1234/ --gen-ai-use open-source
    download_freesound_library.py --library library.toml --dry-run
    download_freesound_library.py --audit --repair

Exit codes:
    0    everything selected is present (or --max reached, or --dry-run / --login done)
    1    some sounds failed, do not exist, or changed since a pinned metadata.json
         (the rest were downloaded); --audit: findings
    2    usage or input error (bad flag, bad ID line, unreadable metadata.json, ...)
    3    authentication or credential problem
    4    stopped at a daily limit with sounds left: re-run after the time shown
    130  interrupted (Ctrl-C); 143 terminated (SIGTERM)
"""
# Reading this file: pure logic first (parsing, names, pacing arithmetic, the retry
# decision, reports, metadata), then the I/O built on it. One download, from main() down:
#   main() maps errors to exit codes -> program() picks the action -> download_library()
#   locks the output folder, select()s the new sounds -> Downloader runs --jobs workers ->
#   download_to() -> Api.open_download() -> ApiSession.send(): Limits.acquire() waits for a
#   slot, then the credential is attached, then decide() judges the answer -> the body
#   streams to <name>.part with size and md5 checked -> renamed into place, and
#   Library.record() rewrites metadata.json and ATTRIBUTION.txt.
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import enum
import functools
import hashlib
import ipaddress
import itertools
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TextIO, TypeVar
from urllib.parse import parse_qs, quote, urlencode, urlsplit

# requests, freesound, oauthlib and tqdm are imported where they are first needed:
# `--help`, usage errors and runs with nothing to fetch start without them.
if TYPE_CHECKING:
    import zipfile

    import requests

T = TypeVar("T")
__version__ = "0.1.0"
PROG = "download_freesound_library.py"

###############################################################################
# Constants ###################################################################
###############################################################################

DEFAULT_API_BASE = "https://freesound.org/apiv2"
SITE_SOUND_URL = "https://freesound.org/s/{sound_id}/"
ENV_CLIENT_ID = "FREESOUND_CLIENT_ID"
ENV_CLIENT_SECRET = "FREESOUND_CLIENT_SECRET"
ENV_API_URL = "FREESOUND_API_URL"
ENV_STATE_DIR = "FREESOUND_STATE_DIR"
CREDENTIALS_PAGE = "https://freesound.org/apiv2/apply/"

DEFAULT_RATE_PER_MIN = 29
DEFAULT_DAILY_CAP = 500
DEFAULT_API_RATE_PER_MIN = 60  # the server's own per-credential limits (level 1)
DEFAULT_API_DAILY_CAP = 2000
MINUTE_S = 60.0
DAY_S = 86400.0

SORT_KEYS = (
    "score", "duration_desc", "duration_asc", "created_desc", "created_asc",
    "downloads_desc", "downloads_asc", "rating_desc", "rating_asc",
)
PAGE_SIZE = 150  # the API's maximum; larger values are silently clamped
# Everything metadata.json and the file name need, asked for in the same call.
SEARCH_FIELDS = (
    "id,name,username,license,duration,samplerate,bitdepth,channels,type,"
    "filesize,md5,tags,description,pack_name,created,category,subcategory,gen_ai_preference"
)
API_OWNED_KEYS = tuple(SEARCH_FIELDS.split(","))

# Measured with `python bench/run.py --chunks` (512 MiB over loopback, write + md5 on a
# helper thread): 16 KiB ~150 MiB/s, 64-256 KiB ~200-300, 1 MiB ~390, 4 MiB ~325. Past
# 1 MiB nothing is gained and every chunk in flight is memory, so 1 MiB it is.
CHUNK_SIZE_BYTES = 1024 * 1024
DEFAULT_JOBS = 4
MAX_JOBS = 16
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_S = 1.0
BACKOFF_MAX_S = 60.0
RETRY_AFTER_MAX_S = 300.0
RETRY_STATUSES = frozenset({500, 502, 503, 504})
TOKEN_EXPIRY_MARGIN_S = 60.0
LOGIN_TIMEOUT_S = 300.0
# A whole name has to fit in 255 bytes *with* the ".part" suffix while downloading.
PART_SUFFIX = ".part"
MAX_NAME_BYTES = 255 - len(PART_SUFFIX)
KNOWN_TYPES = frozenset({"wav", "ogg", "aiff", "mp3", "flac", "m4a", "wv"})
LEDGER_COMPACT_ROWS = 20000
PACK_MEMBER = "pack-member"  # a ledger row for a sound that came inside a pack's zip
USER_AGENT = f"freesound-library-downloader/{__version__}"

###############################################################################
# Exit codes and errors #######################################################
###############################################################################


class ExitCode(enum.IntEnum):
    SUCCESS = 0
    SOME_FAILED = 1
    USAGE = 2
    AUTH = 3
    DAILY_LIMIT = 4
    INTERRUPTED = 130
    TERMINATED = 143


class FreesoundDownloadError(Exception):
    """Base of our errors; each carries the exit code main() returns for it.

    FreesoundDownloadError         1
     ├── UsageError                2  bad flags or input, unusable files or folders
     ├── AuthError                 3  credentials, login, token refresh, suspension
     │    └── LoginExpired         3  the refresh token was rejected: log in again
     ├── ApiError(status, url)     1  a request failed for good
     │    ├── NotFound             1  404: the caller says what a missing thing means
     │    └── Unavailable          1  no usable answer after the retries (5xx, 429/minute)
     │         └── NetworkError    1  no answer at all, or a body cut short
     ├── DownloadError(sound_id)   -  one sound failed; counted, the run goes on
     │    └── CorruptDownload      -  wrong size or md5: discarded, fetched once more
     └── DailyLimitReached         4  stop cleanly, re-run later
    Terminated (BaseException)     143 SIGTERM, handled like Ctrl-C
    Stopped (BaseException)        -  a worker told to stop: no new request, .part kept
    """

    exit_code = ExitCode.SOME_FAILED


class UsageError(FreesoundDownloadError):
    exit_code = ExitCode.USAGE


class AuthError(FreesoundDownloadError):
    exit_code = ExitCode.AUTH


class LoginExpired(AuthError):
    """The refresh token was rejected (revoked, or rotated by another run): log in again."""


class ApiError(FreesoundDownloadError):
    def __init__(self, status: int, url: str, detail: str) -> None:
        self.status, self.url, self.detail = status, url, detail
        super().__init__(f"HTTP {status} for {redact_url(url)}: {detail}")


class NotFound(ApiError):
    """404: a sound, pack, user or page that is not there."""


class Unavailable(ApiError):
    """The server gave no usable answer, even after the retries."""


class NetworkError(Unavailable):
    """No answer at all (refused, reset, timed out), or a body cut short."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(0, url, reason)


class DownloadError(FreesoundDownloadError):
    def __init__(self, sound_id: int, reason: str) -> None:
        self.sound_id, self.reason = sound_id, reason
        super().__init__(f"sound {sound_id}: {reason}")


class CorruptDownload(DownloadError):
    """The bytes arrived but are not the sound: worth one more try from scratch."""


class DailyLimitReached(FreesoundDownloadError):
    exit_code = ExitCode.DAILY_LIMIT

    def __init__(self, what: str, frees_at: dt.datetime | None) -> None:
        self.what, self.frees_at = what, frees_at
        when = f"; the window frees at {format_utc(frees_at)}" if frees_at else ""
        super().__init__(f"{what} reached{when}")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so `finally` blocks run as for Ctrl-C."""


class Stopped(BaseException):
    """The run has decided to stop (a daily limit, a fatal error, Ctrl-C): a worker starts
    no new request, and a transfer told to abort keeps its .part for next time."""


###############################################################################
# Configuration ###############################################################
###############################################################################


class Action(enum.Enum):
    """What a run does; the first flag in this order wins."""

    PRINT_FILTER = "print the compiled filter"
    LOGIN = "log in"
    LOGOUT = "forget the stored token and credentials"
    EXCLUDE = "remove sounds from the library for good"
    AUDIT = "compare the library with Freesound and with its own records"
    LIST_BOOKMARKS = "list bookmark categories"
    STATUS = "report the windows, login and library"
    DRY_RUN = "plan, download nothing"
    DOWNLOAD = "download"


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs, validated; built from the command line by config_from_args()."""

    action: Action = Action.DOWNLOAD
    # The source: exactly one of these is set for DOWNLOAD and DRY_RUN.
    query: str | None = None
    ids: tuple[int, ...] | None = None
    pins: dict[int, Pin] = dataclasses.field(default_factory=dict)  # from a metadata.json --ids-file
    accept_changed: bool = False
    exclude: tuple[int, ...] = ()
    repair: bool = False  # with AUDIT: download missing or damaged files again
    pack: int | None = None
    user: str | None = None
    bookmark_category: str | None = None  # an id or a name
    similar_to: int | None = None
    similarity_space: str | None = None
    filter: str | None = None
    sort: str | None = None
    max: int | None = None
    output_dir: Path = Path("sounds")
    rate: float = DEFAULT_RATE_PER_MIN
    daily_cap: int = DEFAULT_DAILY_CAP
    api_rate: float = DEFAULT_API_RATE_PER_MIN
    api_daily_cap: int = DEFAULT_API_DAILY_CAP
    wait: bool = False
    json: bool = False
    sidecars: bool = False
    previews: str | None = None
    auth_code: str | None = None
    redirect_uri: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    api_base: str = DEFAULT_API_BASE
    state_dir: Path = Path(".")
    jobs: int = DEFAULT_JOBS
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF_S
    timeout: float = READ_TIMEOUT_S
    wait_lock: bool = False
    notes: tuple[str, ...] = ()  # told once on stderr before the run, e.g. an ac_ name rewritten
    collections: tuple[Collection, ...] = ()  # from --library: each run in turn

    @property
    def download_interval_s(self) -> float:
        """Start-to-start spacing of downloads: the stricter of --rate and --api-rate."""
        return MINUTE_S / min(self.rate, self.api_rate)

    def check_credentials(self) -> None:
        """Checked when a request first needs them, so a run with nothing to fetch needs none."""
        if not self.client_id or not self.client_secret:
            raise AuthError(
                f"missing API credentials: set {ENV_CLIENT_ID} and {ENV_CLIENT_SECRET} "
                f"(client id and client secret/API key from {CREDENTIALS_PAGE})")


###############################################################################
# Pure: sound IDs and search filters ##########################################
###############################################################################

_SOUND_URL_RE = re.compile(
    r"^https?://(?:www\.)?freesound\.org/(?:s/(\d+)|people/[^/\s]+/sounds/(\d+))/?(?:[?#]\S*)?$",
    re.IGNORECASE,
)


def parse_sound_ref(text: str) -> int | None:
    """Return the sound ID in `text` (a bare ID or a sound page URL), else None."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        return int(text) or None
    match = _SOUND_URL_RE.match(text)
    return int(match.group(1) or match.group(2)) if match else None


def strip_comment(line: str) -> str:
    """The line without its comment: '#' at the start or after a space (URLs may hold '#')."""
    return re.sub(r"(^|\s)#.*", "", line).strip()


def parse_id_lines(lines: Iterable[str], source: str) -> list[int]:
    """Parse one sound per line; skip blanks and # comments; drop repeats, keep order.

    :raises UsageError: naming `source` and the 1-based line number of a bad line.
    """
    ids: dict[int, None] = {}
    for number, line in enumerate(lines, start=1):
        text = strip_comment(line)
        if not text:
            continue
        sound_id = parse_sound_ref(text)
        if sound_id is None:
            raise UsageError(f"{source}, line {number}: not a Freesound sound ID or URL: {text!r}")
        ids.setdefault(sound_id, None)
    return list(ids)


def metadata_ids(entries: Iterable[dict], source: str) -> tuple[list[int], dict[int, Pin]]:
    """The sounds of a metadata.json used as an ID file, and a pin for each: the md5 of the
    original that was downloaded, and when. Previews' md5s are their own, so they pin nothing."""
    ids: dict[int, None] = {}
    pins: dict[int, Pin] = {}
    for entry in entries:
        sound_id = parse_sound_ref(str(entry.get("id")))
        if sound_id is None:
            raise UsageError(f"{source}: not a Freesound sound ID: {entry.get('id')!r}")
        ids.setdefault(sound_id, None)
        if entry.get("md5") and not entry.get("preview"):
            pins[sound_id] = Pin(str(entry["md5"]).lower(), str(entry.get("downloaded_at") or "it was recorded"))
    return list(ids), pins


@dataclasses.dataclass(frozen=True)
class Pin:
    """The original a metadata.json recorded: a sound whose md5 on Freesound differs has changed."""

    md5: str
    since: str  # when it was downloaded


def changed_sounds(sounds: Sequence[dict], pins: dict[int, Pin]) -> tuple[list[dict], dict[int, str]]:
    """Split off the sounds whose original is no longer the pinned one: (the rest, {id: since})."""
    kept, changed = [], {}
    for sound in sounds:
        pin = pins.get(int(sound["id"]))
        if pin is not None and sound.get("md5") and str(sound["md5"]).lower() != pin.md5:
            changed[int(sound["id"])] = pin.since
        else:
            kept.append(sound)
    return kept, changed


# What --license takes, and the licence *names* Freesound's filters match (not the deed URLs).
LICENSE_FILTER_NAMES = {"cc0": "Creative Commons 0", "by": "Attribution",
                        "by-nc": "Attribution NonCommercial", "sampling+": "Sampling+"}
AUDIO_TYPES = ("wav", "flac", "aiff", "ogg", "mp3", "m4a")


def quote_filter_value(value: str) -> str:
    """A Solr phrase: double quotes around it, backslash and double quote escaped inside."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _number(value: float) -> str:
    return f"{value:g}"


def filter_clauses(*, licenses: Sequence[str] = (), min_duration: float | None = None,
                   max_duration: float | None = None, types: Sequence[str] = (), samplerate: int | None = None,
                   bitdepth: int | None = None, channels: int | None = None, tags: Sequence[str] = ()) -> list[str]:
    """The file-property helpers in Solr syntax: licences and types ORed within their flag,
    tags ANDed."""
    clauses = []
    if licenses:
        names = " OR ".join(quote_filter_value(LICENSE_FILTER_NAMES[name]) for name in dict.fromkeys(licenses))
        clauses.append(f"license:({names})")
    if min_duration is not None or max_duration is not None:
        low = "*" if min_duration is None else _number(min_duration)
        high = "*" if max_duration is None else _number(max_duration)
        clauses.append(f"duration:[{low} TO {high}]")
    if types:
        clauses.append("type:(" + " OR ".join(dict.fromkeys(types)) + ")" if len(set(types)) > 1
                       else f"type:{types[0]}")
    for field, value in (("samplerate", samplerate), ("bitdepth", bitdepth), ("channels", channels)):
        if value is not None:
            clauses.append(f"{field}:{value}")
    return clauses + [f"tag:{quote_filter_value(tag)}" for tag in tags]


def build_filter(user_filter: str | None, clauses: Sequence[str] = ()) -> str | None:
    """--filter ANDed (space-separated) with the helpers' clauses.

    A --filter with OR in it is put in parentheses, so that the clauses added after it
    cannot change its meaning; and no descriptor is left directly after a parenthesis
    (see pad_descriptor_groups)."""
    if user_filter and clauses and " OR " in user_filter and not user_filter.startswith("{!"):
        user_filter = f"({user_filter})"
    compiled = " ".join(([user_filter] if user_filter else []) + list(clauses))
    return pad_descriptor_groups(compiled) if compiled else None


def id_filter(sound_ids: Sequence[int]) -> str:
    """The Solr filter that selects exactly these sounds: id:(1 OR 2 OR 3)."""
    return "id:(" + " OR ".join(str(i) for i in sound_ids) + ")"


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` items (the last may be shorter), taken lazily."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


###############################################################################
# Pure: today's search: descriptors, taxonomy, AI preference, sort ############
###############################################################################

# What Freesound's search knows since November 2025. The server adds a type suffix to a
# descriptor's name before Solr sees it, and only to a space-separated token that *starts*
# with the name: `(bpm:1 OR bpm:2)` and `-loopable:true` reach Solr with a bare name and
# fail with 400. Compiled filters therefore pad such groups, `( bpm:1 OR bpm:2 )`.


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """A filterable audio descriptor: its kind and documented range (None: open)."""

    name: str
    kind: str  # "number", "integer", "bool" or "text"
    low: float | None = None
    high: float | None = None

    def range_text(self) -> str:
        return f"{_number(self.low) if self.low is not None else '*'} to " \
               f"{_number(self.high) if self.high is not None else '*'}"


def _descriptors(kind: str, names: str, low: float | None = None, high: float | None = None) -> dict:
    return {name: Descriptor(name, kind, low, high) for name in names.split()}


DESCRIPTORS: dict[str, Descriptor] = {
    **_descriptors("number", "boominess brightness depth hardness roughness sharpness warmth", 0, 100),
    **_descriptors("number", "amplitude_peak_ratio bpm_confidence dissonance inharmonicity note_confidence "
                             "pitch_confidence pitch_salience silence_rate spectral_flatness temporal_centroid "
                             "temporal_centroid_ratio tonality_confidence zero_crossing_rate", 0, 1),
    **_descriptors("number", "pitch pitch_max pitch_min spectral_centroid spectral_rolloff", 0, 25000),
    **_descriptors("number", "bpm duration_effective start_time", 0),
    **_descriptors("number", "beat_loudness decay_strength dynamic_range hpcp_crest hpcp_entropy log_attack_time "
                             "loudness pitch_var spectral_complexity spectral_crest spectral_energy "
                             "spectral_entropy spectral_skewness spectral_spread temporal_decrease "
                             "temporal_skewness temporal_spread"),
    **_descriptors("integer", "beat_count onset_count birdnet_detections_count fsdsinet_detections_count", 0),
    **_descriptors("integer", "note_midi", 0, 127),
    **_descriptors("bool", "loopable single_event reverbness has_audio_problems"),
    **_descriptors("text", "note_name tonality category subcategory birdnet_detected_class "
                           "fsdsinet_detected_class"),
}
NOT_FILTERABLE = frozenset("mfcc mfcc_var hpcp hpcp_var tristimulus beat_times onset_times birdnet_detections "
                           "fsdsinet_detections".split())
# The AudioCommons names the older guides teach, and what they are called today.
AC_RENAMES = {
    "ac_tempo": "bpm", "ac_tempo_confidence": "bpm_confidence", "ac_loop": "loopable",
    "ac_single_event": "single_event", "ac_note_name": "note_name", "ac_note_midi": "note_midi",
    "ac_note_confidence": "note_confidence", "ac_tonality": "tonality",
    "ac_tonality_confidence": "tonality_confidence", "ac_reverb": "reverbness",
    **{f"ac_{name}": name for name in ("brightness", "depth", "hardness", "roughness", "boominess", "warmth",
                                       "sharpness", "loudness", "dynamic_range", "temporal_centroid",
                                       "log_attack_time")},
}
AC_RETIRED = {"ac_note_frequency": "pitch (the mean fundamental frequency, in Hz)"}

# The Broad Sound Taxonomy: exact, case-sensitive names in filters. Every category has an "Other".
TAXONOMY = {
    "Music": ("Solo percussion", "Solo instrument", "Multiple instruments", "Other"),
    "Instrument samples": ("Percussion", "String", "Wind", "Piano / Keyboard instruments",
                           "Synths / Electronic", "Other"),
    "Speech": ("Solo speech", "Conversation / Crowd", "Processed / Synthetic", "Other"),
    "Sound effects": ("Objects / House appliances", "Vehicles", "Other mechanisms, engines, machines",
                      "Human sounds and actions", "Animals", "Natural elements and explosions", "Experimental",
                      "Electronic / Design", "Other"),
    "Soundscapes": ("Nature", "Indoors", "Urban", "Synthetic / Artificial", "Other"),
}

# Each uploader's stated wish for generative-AI training, most permissive first. It is not
# a licence term. --gen-ai-use X selects the first GEN_AI_USES[X] of them; never no-gen-ai.
GEN_AI_PREFERENCES = ("no-additional-preferences", "open-source-models", "noncommercial-open-source-models",
                      "no-gen-ai")
GEN_AI_USES = {"proprietary": 1, "open-source": 2, "open-source-noncommercial": 3}
SIMILARITY_SPACES = ("laion_clap", "freesound_classic")

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_FLATS = {"Db": "C#", "Eb": "D#", "Gb": "F#", "Ab": "G#", "Bb": "A#"}
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE_RE = re.compile(rf"(?P<low>{_NUMBER}|\*)?\s*-\s*(?P<high>{_NUMBER}|\*)?")
_AC_NAME_RE = re.compile(r"(?<![\w.])(ac_[a-z_]+):")
_SIGNED_FIELD_RE = re.compile(r"(?:^|[\s(])([-+!]([a-z_]+):\S*)")
_GROUP_FIELD_RE = re.compile(r"\s*([a-z_]+):")


def modern_name(name: str) -> tuple[str, str | None]:
    """Today's name for a descriptor, and the note to show if it was an old `ac_` name."""
    if name in AC_RETIRED:
        raise UsageError(f"{name} no longer exists on Freesound and has no successor; use {AC_RETIRED[name]}")
    if name in AC_RENAMES:
        return AC_RENAMES[name], f"note: {name} is now called {AC_RENAMES[name]}"
    return name, None


def find_descriptor(name: str) -> Descriptor:
    """The filterable descriptor called `name`; UsageError naming the closest ones otherwise."""
    import difflib

    if name in DESCRIPTORS:
        return DESCRIPTORS[name]
    if name in NOT_FILTERABLE:
        raise UsageError(f"the descriptor {name} cannot be used in filters (Freesound does not index it)")
    close = ([AC_RENAMES[f"ac_{name}"]] if f"ac_{name}" in AC_RENAMES else []) + [
        match for match in difflib.get_close_matches(name, DESCRIPTORS, n=3, cutoff=0.6)
        if match != AC_RENAMES.get(f"ac_{name}")]
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see README.md for the list"
    raise UsageError(f"unknown descriptor {name!r}{hint}")


def _unquoted(text: str) -> str:
    """`text` with every quoted phrase blanked out, same length: positions stay valid."""
    return re.sub(r'"(?:[^"\\]|\\.)*"?', lambda m: '"' + " " * (len(m.group()) - 1), text)


def modernize_filter(text: str) -> tuple[str, list[str]]:
    """A user's filter with the old `ac_` names renamed (and a note for each), checked for
    a descriptor with a sign before it, which the server cannot read."""
    notes: dict[str, None] = {}
    for match in reversed(list(_AC_NAME_RE.finditer(_unquoted(text)))):
        new, note = modern_name(match.group(1))
        if new == match.group(1):
            find_descriptor(new)  # an ac_ name we do not know: say what is close
        text = text[:match.start(1)] + new + text[match.end(1):]
        notes[note or ""] = None
    for match in _SIGNED_FIELD_RE.finditer(_unquoted(text)):
        if match.group(2) in DESCRIPTORS:
            raise UsageError(f"--filter: Freesound cannot read a descriptor with a sign before it "
                             f"({text[match.start(1):match.end(1)]}); filter on the opposite value instead, "
                             f"e.g. loopable:false rather than -loopable:true")
    return text, [note for note in reversed(notes) if note]


def pad_descriptor_groups(text: str) -> str:
    """`(bpm:1 OR bpm:2)` -> `( bpm:1 OR bpm:2 )`: a descriptor never directly after `(`."""
    masked, out, padded = _unquoted(text), [], []
    for index, char in enumerate(text):
        if masked[index] == "(":
            field = _GROUP_FIELD_RE.match(masked, index + 1)
            padded.append(bool(field and field.group(1) in DESCRIPTORS))
            char = "( " if padded[-1] and not text[index + 1:index + 2].isspace() else char
        elif masked[index] == ")" and padded:
            char = " )" if padded.pop() and not text[index - 1:index].isspace() else char
        out.append(char)
    return "".join(out)


def number_range(text: str, what: str) -> tuple[float | None, float | None]:
    """`N` (exactly N), `MIN-MAX`, `MIN-` or `-MAX` (open side; `*` works too)."""
    text = text.strip()
    if re.fullmatch(_NUMBER, text) and not text.startswith("-"):
        return float(text), float(text)
    match = _RANGE_RE.fullmatch(text)
    low, high = (match.group("low"), match.group("high")) if match else (None, None)
    if not match or (low in (None, "*") and high in (None, "*")):
        raise UsageError(f"{what}: expected a number or a range MIN-MAX (either side may be open), got {text!r}")
    low_value = None if low in (None, "*") else float(low)
    high_value = None if high in (None, "*") else float(high)
    if low_value is not None and high_value is not None and low_value > high_value:
        raise UsageError(f"{what}: {text!r} is an empty range ({_number(low_value)} is above {_number(high_value)})")
    return low_value, high_value


def _check_bounds(descriptor: Descriptor, values: Iterable[float | None], what: str) -> None:
    for value in values:
        if value is None:
            continue
        if descriptor.kind == "integer" and value != int(value):
            raise UsageError(f"{what}: {descriptor.name} takes whole numbers, got {_number(value)}")
        if ((descriptor.low is not None and value < descriptor.low)
                or (descriptor.high is not None and value > descriptor.high)):
            raise UsageError(f"{what}: {_number(value)} is outside {descriptor.name}'s range "
                             f"({descriptor.range_text()})")


def descriptor_clause(descriptor: Descriptor, value: str, what: str) -> str:
    """One descriptor's filter clause for a value: `bpm:120`, `bpm:[118 TO 122]`,
    `loopable:true`, `note_name:"A4"`. Values are checked against the documented range."""
    name = descriptor.name
    if descriptor.kind == "bool":
        if value.strip().lower() not in ("true", "false"):
            raise UsageError(f"{what}: {name} is true or false, got {value!r}")
        return f"{name}:{value.strip().lower()}"
    if descriptor.kind == "text":
        return f"{name}:{quote_filter_value(TEXT_CHECKS.get(name, _any_text)(value, what))}"
    low, high = number_range(value, what)
    _check_bounds(descriptor, (low, high), what)
    if low is not None and low == high:
        return f"{name}:{_number(low)}"
    return f"{name}:[{'*' if low is None else _number(low)} TO {'*' if high is None else _number(high)}]"


def descriptor_option(spec: str) -> tuple[str, list[str]]:
    """--descriptor NAME=VALUE or NAME=MIN-MAX: its clause, and a note if NAME was an ac_ name."""
    name, sep, value = spec.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise UsageError(f"--descriptor {spec!r}: expected NAME=VALUE or NAME=MIN-MAX, e.g. brightness=70-100")
    name, note = modern_name(name.strip())
    return descriptor_clause(find_descriptor(name), value, f"--descriptor {spec}"), [note] if note else []


def _any_text(value: str, what: str) -> str:
    if not value.strip():
        raise UsageError(f"{what}: the value cannot be empty")
    return value.strip()


def canonical_note(value: str, what: str = "--note") -> str:
    """`a4`, `Bb3`, `C#-1` -> Freesound's spelling: one of the 12 sharps-only names and an octave."""
    match = re.fullmatch(r"([A-Ga-g])([#b]?)(-?\d)", value.strip())
    note = _sharp(match.group(1), match.group(2)) if match else ""
    if not match or note not in NOTE_NAMES:
        raise UsageError(f"{what}: {value!r} is not a note name like A4, C#3 or Bb2 (octaves -1 to 9)")
    return note + match.group(3)


def canonical_key(value: str, what: str = "--tonality") -> str:
    """`c minor`, `Bb major` -> `C minor`, `A# major`: Freesound's key names."""
    match = re.fullmatch(r"([A-Ga-g])([#b]?)\s+(major|minor)", value.strip(), re.IGNORECASE)
    root = _sharp(match.group(1), match.group(2)) if match else ""
    if not match or root not in NOTE_NAMES:
        raise UsageError(f"{what}: {value!r} is not a key like \"C minor\" or \"F# major\"")
    return f"{root} {match.group(3).lower()}"


def _sharp(letter: str, accidental: str) -> str:
    """A note letter and accidental as Freesound spells it: Bb -> A#."""
    note = letter.upper() + accidental
    return _FLATS.get(note, note)


def _taxonomy_key(name: str) -> str:
    return re.sub(r"\s*/\s*", "/", " ".join(name.split())).casefold()


def canonical_category(value: str, what: str = "--category") -> str:
    """The exact category name for any capitalisation of it."""
    for category in TAXONOMY:
        if _taxonomy_key(category) == _taxonomy_key(value):
            return category
    raise UsageError(f"{what}: {value!r} is not a Freesound category; one of: {', '.join(TAXONOMY)}")


def canonical_subcategory(value: str, what: str = "--subcategory", category: str | None = None) -> tuple[str, str]:
    """(category, subcategory) for any capitalisation of a subcategory name, within
    `category` if given; a name found under several categories needs the category."""
    places = [(cat, sub) for cat, subs in TAXONOMY.items() if category in (None, cat)
              for sub in subs if _taxonomy_key(sub) == _taxonomy_key(value)]
    if len(places) == 1:
        return places[0]
    if places:
        raise UsageError(f"{what}: {places[0][1]!r} is in every category; add --category "
                         f"(one of: {', '.join(TAXONOMY)})")
    valid = "; ".join(f"{cat}: {', '.join(subs)}" for cat, subs in TAXONOMY.items() if category in (None, cat))
    raise UsageError(f"{what}: {value!r} is not a Freesound subcategory{f' of {category}' if category else ''}; "
                     f"valid: {valid}")


TEXT_CHECKS: dict[str, Callable[[str, str], str]] = {
    "note_name": canonical_note, "tonality": canonical_key, "category": canonical_category,
    "subcategory": lambda value, what: canonical_subcategory(value, what)[1],
}


def taxonomy_clauses(category: str | None, subcategory: str | None) -> list[str]:
    """--category and --subcategory as clauses; a subcategory brings its category along."""
    if category is not None:
        category = canonical_category(category)
    if subcategory is not None:
        category, subcategory = canonical_subcategory(subcategory, category=category)
    return [f"{field}:{quote_filter_value(value)}"
            for field, value in (("category", category), ("subcategory", subcategory)) if value is not None]


def gen_ai_clause(use: str) -> str:
    """The preferences that allow training a model of this kind (never `no-gen-ai`)."""
    allowed = GEN_AI_PREFERENCES[:GEN_AI_USES[use]]
    return "gen_ai_preference:(" + " OR ".join(quote_filter_value(p) for p in allowed) + ")"


def sort_option(text: str) -> tuple[str, list[str]]:
    """--sort: a named order, or closeness to targets `bpm:120,brightness:80` (numeric
    descriptors, values in their range); returns it as sent, with notes for ac_ names."""
    if text in SORT_KEYS:
        return text, []
    if ":" not in text:
        raise UsageError(f"--sort {text!r}: use one of {', '.join(SORT_KEYS)}, "
                         "or DESCRIPTOR:TARGET[,DESCRIPTOR:TARGET...] such as bpm:120,brightness:80")
    targets, notes = [], []
    for pair in text.split(","):
        name, _, target = pair.strip().partition(":")
        name, note = modern_name(name.strip())
        notes += [note] if note else []
        descriptor = find_descriptor(name)
        if descriptor.kind not in ("number", "integer") or not re.fullmatch(_NUMBER, target.strip()):
            raise UsageError(f"--sort {pair.strip()!r}: sort targets are numeric descriptors with a number, "
                             "e.g. bpm:120")
        _check_bounds(descriptor, [float(target)], f"--sort {pair.strip()}")
        targets.append(f"{name}:{_number(float(target))}")
    return ",".join(targets), notes


###############################################################################
# Pure: file names, licences, URLs, folders ###################################
###############################################################################


def slugify(text: str) -> str:
    """Django's slugify, which Freesound uses for its download file names."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text.lower())
    return re.sub(r"[-\s]+", "-", text).strip("-_")


def sound_filename(sound: dict, preview: str | None = None) -> str:
    """`<id>__<user>__<name>.<type>`, as Freesound's Content-Disposition names it.

    Slugs are ASCII letters, digits, '-' and '_' only, so the name cannot leave the
    output folder or hit a reserved name (the id prefix also keeps it unique), and
    it is cut so that even the ".part" name fits in 255 bytes. A preview ("hq-mp3")
    is `<id>__<user>__<name>__preview-hq.mp3`: never the name of an original.
    """
    quality, _, extension = (preview or "").partition("-")
    sound_type = extension or slugify(str(sound.get("type") or ""))[:4] or "bin"
    tail = f"__preview-{quality}.{sound_type}" if preview else f".{sound_type}"
    head = f"{int(sound['id'])}__{slugify(str(sound.get('username') or ''))}__"
    stem = slugify(os.path.splitext(str(sound.get("name") or ""))[0])
    room = MAX_NAME_BYTES - len(head) - len(tail)
    if room < 0:  # an absurdly long username: keep the id, which is what makes it unique
        head = f"{int(sound['id'])}__{slugify(str(sound.get('username')))[:100]}__"
        room = MAX_NAME_BYTES - len(head) - len(tail)
    return f"{head}{stem[:room].rstrip('-_')}{tail}"


PREVIEW_KINDS = ("hq-mp3", "hq-ogg", "lq-mp3", "lq-ogg")


def preview_url(sound: dict, kind: str) -> str | None:
    """The preview's URL; the freesound client spells the keys with '_' once it has wrapped them."""
    previews = sound.get("previews") or {}
    return previews.get(f"preview-{kind}") or previews.get(f"preview_{kind.replace('-', '_')}")


_LICENSE_NAMES = {
    "zero": "CC0", "by": "CC BY", "by-nc": "CC BY-NC", "sampling+": "Sampling+",
    "creative commons 0": "CC0", "attribution": "CC BY",
    "attribution noncommercial": "CC BY-NC",
}
LICENSE_ORDER = ("CC0", "CC BY", "CC BY-NC", "Sampling+")


def license_name(license_value: str) -> str:
    """'CC0 1.0', 'CC BY 4.0', ... from the deed URL the API returns (or a licence name)."""
    value = (license_value or "").strip()
    match = re.search(r"/(?:publicdomain|licenses)/([a-z+-]+)/(\d+\.\d+)", value.lower())
    if match and match.group(1) in _LICENSE_NAMES:
        return f"{_LICENSE_NAMES[match.group(1)]} {match.group(2)}"
    return _LICENSE_NAMES.get(value.lower(), value or "unknown licence")


def license_family(name: str) -> str:
    return name.rsplit(" ", 1)[0] if name.rsplit(" ", 1)[-1][:1].isdigit() else name


def redact_url(url: str) -> str:
    """The URL without its query string, which may carry a token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_DOWNLOAD_PATH_RE = re.compile(r"/(sounds|packs)/(\d+)/download/$")


def classify_request(url: str, api_base: str) -> tuple[str, int | None]:
    """('download', sound_id) for an original's download URL, ('pack', pack_id) for a
    pack's zip, else ('api', None)."""
    base_path = urlsplit(api_base).path.rstrip("/")
    path = urlsplit(url).path
    match = _DOWNLOAD_PATH_RE.fullmatch(path[len(base_path):]) if path.startswith(base_path) else None
    if not match:
        return "api", None
    return "download" if match.group(1) == "sounds" else "pack", int(match.group(2))


def needs_oauth(url: str, api_base: str) -> bool:
    """Downloads, packs' zips and the logged-in user's own resources (/me/...) take only OAuth2."""
    path = urlsplit(url).path[len(urlsplit(api_base).path.rstrip("/")):]
    return classify_request(url, api_base)[0] in ("download", "pack") or path.startswith("/me/")


def default_state_dir(platform: str, environ: dict, home: Path) -> Path:
    """The per-user config folder: XDG on Linux, Application Support, %APPDATA%."""
    if platform.startswith("win"):
        return Path(environ.get("APPDATA") or home / "AppData" / "Roaming") / "freesound-downloader"
    if platform == "darwin":
        return home / "Library" / "Application Support" / "freesound-downloader"
    return Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "freesound-downloader"


###############################################################################
# Pure: pacing, rolling windows, backoff, throttles ###########################
###############################################################################


def times_in_window(times: Iterable[float], now: float, window_s: float) -> list[float]:
    """The timestamps that are still inside the rolling window ending at `now`, sorted."""
    return sorted(t for t in times if now - window_s < t <= now + 1.0)


def window_frees_at(times: Sequence[float], limit: int, now: float, window_s: float) -> float:
    """When the window next has room for one more request (`now` if it has room now)."""
    inside = times_in_window(times, now, window_s)
    if len(inside) < limit:
        return now
    return inside[len(inside) - limit] + window_s


def pacing_delay(last_start: float | None, interval_s: float, now: float) -> float:
    """Seconds to wait so that starts are at least `interval_s` apart (start-to-start).

    Never more than one interval: after the clock was set back, the last start looks
    like it is in the future, and waiting for it would stall the run for that long."""
    if last_start is None:
        return 0.0
    return min(interval_s, max(0.0, last_start + interval_s - now))


def backoff_delay(attempt: int, base_s: float, rand: float, cap_s: float = BACKOFF_MAX_S) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random (rand in [0, 1))."""
    ceiling = min(cap_s, base_s * 2 ** (attempt - 1))
    return ceiling / 2 + ceiling / 2 * rand


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), clamped to [0, max]."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            from email.utils import parsedate_to_datetime
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def throttle_kind(detail: str) -> str:
    """'day', 'minute' or 'suspended' from the body of Freesound's 429."""
    if "suspended" in detail:
        return "suspended"
    match = re.search(r"\(\d+/(\w)", detail)
    return "day" if match and match.group(1) == "d" else "minute"


def throttle_limit(detail: str) -> int | None:
    """The N of '(N/minute)' in a 429 body."""
    match = re.search(r"\((\d+)/", detail)
    return int(match.group(1)) if match else None


def runs_needed(new: int, daily_cap: int, used_now: int) -> int:
    """How many daily runs it takes to fetch `new` sounds, the current one included."""
    if new <= 0:
        return 0
    left_now = max(0, daily_cap - used_now)
    later = math.ceil(max(0, new - left_now) / daily_cap)
    return later + (1 if left_now else 0)


###############################################################################
# Pure: what a request's answer means #########################################
###############################################################################


class Step(enum.Enum):
    RETURN = "hand the response to the caller"
    RETRY = "send again after delay_s"
    RESEND = "send again with the current token, which another worker or run has replaced"
    REFRESH = "refresh the token (once per request), then send again"
    DAY_LIMIT = "stop the run: the credential's day is used up"
    RAISE = "fail with the error"


@dataclasses.dataclass(frozen=True)
class Answer:
    """One request's answer, reduced to what decide() needs."""

    status: int                   # 0: no answer at all
    detail: str = ""              # the API's `detail`, or why there was no answer
    is_json: bool = True          # API answers must be JSON; a proxy's page is not
    location: str | None = None   # where a redirect points
    token_rejected: bool = False  # 401 with WWW-Authenticate error="invalid_token"
    retry_after_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Attempt:
    url: str
    kind: str                     # "api", "download", "pack" or "preview"
    number: int                   # 1 for the first try
    bearer: bool = False          # sent with the OAuth2 token
    token_replaced: bool = False  # that token has since been replaced by another worker or run
    refreshed: bool = False       # this request has had its one refresh


@dataclasses.dataclass(frozen=True)
class Decision:
    step: Step
    delay_s: float = 0.0
    error: FreesoundDownloadError | None = None
    note: str = ""                # what the user is told about a retry


def decide(answer: Answer, attempt: Attempt, retries: int, backoff_s: float,
           throttle_wait_s: float = 0.0) -> Decision:
    """What to do with an answer: the whole retry policy, and every HTTP status made ours.

    `backoff_s` is this attempt's jittered backoff; `throttle_wait_s` how long until our own
    minute window is under the server's limit (the real 429 has no Retry-After)."""
    status, url, detail = answer.status, attempt.url, answer.detail
    if 200 <= status < 300 and (answer.is_json or attempt.kind != "api"):
        return Decision(Step.RETURN)
    if status == 416 and attempt.kind != "api":  # the .part is already whole
        return Decision(Step.RETURN)
    if 200 <= status < 300:  # a proxy's page where the API's JSON should be
        return Decision(Step.RAISE, error=ApiError(status, url, detail))
    if answer.location is not None:  # the API never redirects; following could leak the token
        reason = f"unexpected redirect to {redact_url(answer.location)}; not followed"
        return Decision(Step.RAISE, error=ApiError(status, url, reason))
    out_of_tries = attempt.number > retries
    if status == 401 and attempt.bearer and answer.token_rejected:
        if attempt.token_replaced and not out_of_tries:
            return Decision(Step.RESEND)
        if not attempt.refreshed and not attempt.token_replaced:
            return Decision(Step.REFRESH)
    if status == 429 and throttle_kind(detail) == "day":
        return Decision(Step.DAY_LIMIT, note=f"Freesound's own daily limit ({detail})")
    if status == 429 and throttle_kind(detail) == "minute":
        wait = answer.retry_after_s if answer.retry_after_s is not None else max(throttle_wait_s, backoff_s)
        wait = min(wait, MINUTE_S)
        return _retry_or_give_up(answer, attempt, out_of_tries, wait,
                                 f"Freesound says slow down (429); waiting {wait:.0f} s")
    if status == 0 or status in RETRY_STATUSES:
        reason = detail if status == 0 else f"HTTP {status}: {detail}"
        return _retry_or_give_up(answer, attempt, out_of_tries, backoff_s,
                                 f"{reason} for {redact_url(url)}; retrying in {backoff_s:.1f} s")
    return Decision(Step.RAISE, error=final_error(status, url, detail, attempt.bearer))


def _retry_or_give_up(answer: Answer, attempt: Attempt, out_of_tries: bool, delay_s: float,
                      note: str) -> Decision:
    if not out_of_tries:
        return Decision(Step.RETRY, delay_s=delay_s, note=note)
    detail = f"{answer.detail} (gave up after {attempt.number} tries)"
    error = (NetworkError(attempt.url, detail) if answer.status == 0
             else Unavailable(answer.status, attempt.url, detail))
    return Decision(Step.RAISE, error=error)


def final_error(status: int, url: str, detail: str, bearer: bool) -> FreesoundDownloadError:
    """The error a final, non-retryable HTTP status means to the user."""
    if status == 429:  # neither the per-day nor the per-minute kind: a suspended credential
        return AuthError(f"Freesound: {detail}")
    if status == 401:
        what = "OAuth2 login" if bearer else f"API key ({ENV_CLIENT_SECRET})"
        return AuthError(f"Freesound rejected the {what}: {detail}")
    if status == 403 and "secure connection" in detail:
        return UsageError(f"Freesound requires https: set {ENV_API_URL} to an https:// URL ({detail})")
    if status == 400:
        return UsageError(f"Freesound rejected the request: {detail}")
    if status == 404:
        return NotFound(status, url, detail)
    return ApiError(status, url, detail)


###############################################################################
# Pure: reports, times and sizes ##############################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Window:
    """The rolling windows as they stand: what --status, --dry-run and summaries report."""

    downloads_used: int
    downloads_left: int
    daily_cap: int
    requests_used: int
    api_daily_cap: int
    requests_last_minute: int
    next_download_slot: str  # an ISO time, or "now"


def window_of(download_times: Sequence[float], request_times: Sequence[float], now: float,
              daily_cap: int, api_daily_cap: int) -> Window:
    used = len(times_in_window(download_times, now, DAY_S))
    frees = window_frees_at(download_times, daily_cap, now, DAY_S)
    return Window(downloads_used=used, downloads_left=max(0, daily_cap - used), daily_cap=daily_cap,
                  requests_used=len(times_in_window(request_times, now, DAY_S)), api_daily_cap=api_daily_cap,
                  requests_last_minute=len(times_in_window(request_times, now, MINUTE_S)),
                  next_download_slot=iso_utc(frees) if frees > now else "now")


def whole_pack(config: Config, selection: Selection, todo: int, window: Window) -> int | None:
    """The --pack to fetch as one zip of originals, if any: only when all of it is wanted
    (every sound new, none excluded, none left for later by --max) and both daily windows
    have room for it; else None, and it goes sound by sound."""
    new = len(selection.new)
    fits = (not config.previews and not selection.excluded and 2 <= new == selection.selected == todo
            and new <= window.downloads_left and window.requests_used < window.api_daily_cap)
    return config.pack if fits else None


@dataclasses.dataclass(frozen=True)
class Selection:
    """The sounds a source names: the new ones in order, and what was left out and why."""

    new: list[dict]
    selected: int
    present: int
    missing: list[int]
    changed: dict[int, str] = dataclasses.field(default_factory=dict)  # id -> when its pinned original came
    excluded: int = 0  # listed in excluded_ids.txt


@dataclasses.dataclass(frozen=True)
class LicenseRow:
    sounds: int = 0
    bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """What --dry-run reports: the new sounds by licence and by their uploaders' generative-AI
    preference, their size, the daily runs they need."""

    selected: int
    present: int
    new: int
    new_bytes: int
    by_license: dict[str, LicenseRow]
    by_gen_ai_preference: dict[str, int]
    not_found: list[int]
    changed: dict[int, str]
    excluded: int
    daily_cap: int
    downloads_used: int
    runs: int

    def text(self) -> str:
        lines = [f"{self.selected} sounds selected, {self.present} already present, "
                 f"{self.new} new ({format_size(self.new_bytes)})"]
        if self.by_license:
            lines += ["", "| licence | sounds | size |", "|---|---:|---:|"]
            lines += [f"| {name} | {row.sounds} | {format_size(row.bytes)} |" for name, row in self.by_license.items()]
            lines += ["", "| generative-AI preference (the uploader's wish, not a licence term) | sounds |",
                      "|---|---:|"]
            lines += [f"| {name} | {count} |" for name, count in self.by_gen_ai_preference.items()]
            lines.append("")
        lines.append(f"at --daily-cap {self.daily_cap} ({self.downloads_used} used in the last 24 hours) "
                     f"that takes {self.runs} run{'s' if self.runs != 1 else ''}, one a day")
        return "\n".join(lines + self.notes())

    def notes(self) -> list[str]:
        """What was not selected, and why."""
        lines = ["not found on Freesound: " + ", ".join(map(str, self.not_found))] if self.not_found else []
        lines += changed_lines(self.changed)
        if self.excluded:
            lines.append(f"left out: {self.excluded} sound{'s' if self.excluded != 1 else ''} in excluded_ids.txt")
        return lines


def changed_lines(changed: dict[int, str]) -> list[str]:
    return [f"sound {sound_id}: changed on Freesound since {since}; not downloaded (--accept-changed fetches it)"
            for sound_id, since in sorted(changed.items())]


def plan(selection: Selection, daily_cap: int, used_now: int) -> Plan:
    todo = selection.new
    by_license: dict[str, LicenseRow] = {}
    by_gen_ai: dict[str, int] = {}
    for sound in todo:
        name = license_name(str(sound.get("license") or ""))
        row = by_license.get(name, LicenseRow())
        by_license[name] = LicenseRow(row.sounds + 1, row.bytes + int(sound.get("filesize") or 0))
        preference = str(sound.get("gen_ai_preference") or "not stated")
        by_gen_ai[preference] = by_gen_ai.get(preference, 0) + 1
    order = {name: index for index, name in enumerate(GEN_AI_PREFERENCES)}
    return Plan(selected=selection.selected, present=selection.present, new=len(todo),
                new_bytes=sum(row.bytes for row in by_license.values()),
                by_license=dict(sorted(by_license.items())),
                by_gen_ai_preference=dict(sorted(by_gen_ai.items(), key=lambda item: order.get(item[0], 99))),
                not_found=list(selection.missing), changed=dict(selection.changed), excluded=selection.excluded,
                daily_cap=daily_cap, downloads_used=used_now, runs=runs_needed(len(todo), daily_cap, used_now))


@dataclasses.dataclass(frozen=True)
class Status:
    """What --status reports, without sending a request."""

    client_id: str
    window: Window
    token_expires_at: str | None
    token_expired: bool
    output_dir: str
    sounds_present: int
    sounds_in_metadata: int

    def text(self) -> str:
        window = self.window
        if self.token_expires_at is None:
            login = f"not logged in: run {PROG} --login"
        else:
            when = format_utc(parse_iso(self.token_expires_at))
            login = (f"access token expired {when}; it is refreshed at the next run" if self.token_expired
                     else f"access token valid until {when} (refreshed automatically)")
        slot = window.next_download_slot
        slot = slot if slot == "now" else format_utc(parse_iso(slot))
        return "\n".join([
            f"credential {self.client_id}:",
            f"  downloads: {window.downloads_used} of {window.daily_cap} used in the rolling 24 hours, "
            f"{window.downloads_left} left; next download slot: {slot}",
            f"  all requests: {window.requests_used} of {window.api_daily_cap} in 24 hours, "
            f"{window.requests_last_minute} in the last minute",
            f"  login: {login}",
            f"output folder {self.output_dir}: {self.sounds_present} sounds present "
            f"({self.sounds_in_metadata} in metadata.json)"])


@dataclasses.dataclass
class RunReport:
    """What a download run did; main() turns it into the exit code."""

    skipped: int = 0
    downloaded: int = 0
    failed: dict[int, str] = dataclasses.field(default_factory=dict)
    missing: list[int] = dataclasses.field(default_factory=list)
    changed: dict[int, str] = dataclasses.field(default_factory=dict)
    remaining: int = 0
    window: Window | None = None
    stopped: DailyLimitReached | None = None

    @property
    def exit_code(self) -> ExitCode:
        if self.stopped is not None:
            return ExitCode.DAILY_LIMIT
        return ExitCode.SOME_FAILED if self.failed or self.missing or self.changed else ExitCode.SUCCESS

    def text(self) -> str:
        lines = [f"downloaded {self.downloaded}, skipped {self.skipped} (already present), "
                 f"failed {len(self.failed) + len(self.missing)}, remaining {self.remaining}"]
        if self.window is not None:
            lines.append(f"downloads left in the rolling 24-hour window: {self.window.downloads_left}")
        lines += [f"  failed {sound_id}: {reason}" for sound_id, reason in sorted(self.failed.items())]
        if self.missing:
            lines.append("  not found on Freesound: " + ", ".join(map(str, self.missing)))
        lines += ["  " + line for line in changed_lines(self.changed)]
        if self.stopped is not None:
            lines.append(f"stopped: {self.stopped}; run again then to fetch the remaining "
                         f"{self.remaining} sound{'s' if self.remaining != 1 else ''}")
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"downloaded": self.downloaded, "skipped": self.skipped, "remaining": self.remaining,
                "failed": [{"id": sound_id, "reason": reason} for sound_id, reason in sorted(self.failed.items())],
                "not_found": self.missing, "window": as_json(self.window),
                "changed": [{"id": sound_id, "since": since} for sound_id, since in sorted(self.changed.items())],
                "stopped": str(self.stopped) if self.stopped else None, "exit_code": int(self.exit_code)}


@dataclasses.dataclass(frozen=True)
class LibraryPlan:
    """--dry-run of a --library file: each collection's plan, and the days all of it needs."""

    plans: dict[str, Plan]
    daily_cap: int
    downloads_used: int
    runs: int

    def text(self) -> str:
        lines = ["| collection | selected | present | new | size |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {p.selected} | {p.present} | {p.new} | {format_size(p.new_bytes)} |"
                  for name, p in self.plans.items()]
        total = list(self.plans.values())
        lines.append(f"| all | {sum(p.selected for p in total)} | {sum(p.present for p in total)} | "
                     f"{sum(p.new for p in total)} | {format_size(sum(p.new_bytes for p in total))} |")
        lines.append(f"\nat --daily-cap {self.daily_cap} ({self.downloads_used} used in the last 24 hours) the "
                     f"whole library takes {self.runs} run{'s' if self.runs != 1 else ''}, one a day")
        lines += [f"{name}: {note}" for name, p in self.plans.items() for note in p.notes()]
        return "\n".join(lines)


@dataclasses.dataclass
class LibraryReport:
    """A --library run: each collection's report, and those a daily limit kept from starting."""

    reports: dict[str, RunReport] = dataclasses.field(default_factory=dict)
    not_started: list[str] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        codes = {report.exit_code for report in self.reports.values()}
        return max(codes & {ExitCode.DAILY_LIMIT, ExitCode.SOME_FAILED}, default=ExitCode.SUCCESS)

    def text(self) -> str:
        lines = [f"collection {name}: " + report.text().replace("\n", "\n  ") for name, report in self.reports.items()]
        if self.not_started:
            lines.append("not started (daily limit): " + ", ".join(self.not_started))
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"collections": {name: report.as_json() for name, report in self.reports.items()},
                "not_started": self.not_started, "exit_code": int(self.exit_code)}


def as_json(report: object) -> object:
    """A report as --json prints it: its own as_json() if it has one, else its fields."""
    if report is None or not dataclasses.is_dataclass(report) or isinstance(report, type):
        return report
    if hasattr(report, "as_json"):
        return report.as_json()
    return dataclasses.asdict(report)


def format_utc(moment: dt.datetime | float) -> str:
    if not isinstance(moment, dt.datetime):
        moment = dt.datetime.fromtimestamp(moment, dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_utc(timestamp: float) -> str:
    moment = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def format_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


###############################################################################
# Pure: auditing a library ####################################################
###############################################################################

# What an audit compares: the value recorded at download time against Freesound's today.
AUDITED_VALUES = (("license", "licence changed"), ("gen_ai_preference", "generative-AI preference changed"))


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing an audit found about one sound."""

    sound_id: int
    kind: str  # gone, license, gen_ai_preference, replaced, missing, damaged
    what: str
    recorded: str | None = None
    now: str | None = None

    def text(self) -> str:
        change = f": {self.recorded} -> {self.now}" if self.recorded is not None or self.now is not None else ""
        return f"sound {self.sound_id}: {self.what}{change}"


def audit_sound(entry: dict, now: dict | None, local: str | None) -> tuple[list[Finding], dict]:
    """What differs for one recorded sound, given Freesound's metadata today (None: gone)
    and the local file's state (None, "missing" or "damaged"); and the `current` values to
    record beside the entry: only those that differ. The recorded licence is never
    replaced: Creative Commons licences are irrevocable, so it is the grant the user holds."""
    sound_id = int(entry["id"])
    findings = [Finding(sound_id, local, f"local file {local}")] if local else []
    if now is None:
        return findings + [Finding(sound_id, "gone", "gone from Freesound")], {"gone_from_freesound": True}
    current: dict = {}
    for key, what in AUDITED_VALUES:
        recorded, today = entry.get(key), now.get(key)
        if today is not None and recorded is not None and today != recorded:
            findings.append(Finding(sound_id, key, what, _audit_label(key, recorded), _audit_label(key, today)))
            current[key] = today
    if not entry.get("preview") and now.get("md5") and entry.get("md5") and now["md5"].lower() != entry["md5"].lower():
        findings.append(Finding(sound_id, "replaced", "original replaced on Freesound (md5 differs)",
                                entry["md5"], now["md5"]))
        current["md5"] = now["md5"]
    return findings, current


def _audit_label(key: str, value: str) -> str:
    return license_name(value) if key == "license" else value


@dataclasses.dataclass
class AuditReport:
    """What --audit found; with --repair, which missing or damaged files came back."""

    audited: int = 0
    findings: list[Finding] = dataclasses.field(default_factory=list)
    repaired: list[int] = dataclasses.field(default_factory=list)

    @property
    def open_findings(self) -> list[Finding]:
        return [f for f in self.findings if not (f.kind in ("missing", "damaged") and f.sound_id in self.repaired)]

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.SOME_FAILED if self.open_findings else ExitCode.SUCCESS

    def text(self) -> str:
        lines = [f"audited {self.audited} sound{'s' if self.audited != 1 else ''}: "
                 f"{len(self.findings)} finding{'s' if len(self.findings) != 1 else ''}"
                 + (f", {len(self.repaired)} repaired" if self.repaired else "")]
        lines += ["  " + finding.text() + (" (repaired)" if finding not in self.open_findings else "")
                  for finding in self.findings]
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"audited": self.audited, "repaired": self.repaired, "exit_code": int(self.exit_code),
                "findings": [dataclasses.asdict(finding) for finding in self.findings]}


###############################################################################
# Pure: metadata and attribution ##############################################
###############################################################################


def metadata_entry(sound: dict, file_name: str, downloaded_at: str) -> dict:
    """What metadata.json records of one downloaded sound."""
    entry = {key: sound.get(key) for key in API_OWNED_KEYS}
    entry["id"] = int(sound["id"])
    entry["license_name"] = license_name(str(sound.get("license") or ""))
    entry["url"] = SITE_SOUND_URL.format(sound_id=entry["id"])
    entry["file"] = file_name
    entry["downloaded_at"] = downloaded_at
    if sound.get("preview"):  # then filesize, md5 and type are the preview's own
        entry["preview"] = sound["preview"]
    return entry


def fold_metadata(existing: Iterable[tuple[dict, str]], updates: dict[int, dict], removed: Container[int],
                  credits: list[dict]) -> Iterator[str]:
    """metadata.json's lines, sorted by id, after merging `updates` over the recorded entries
    (keys the user added are kept) and dropping `removed`; each kept entry's credit is
    appended to `credits`, for ATTRIBUTION.txt. `existing` (sorted by id) pairs each entry
    with its line as written, kept as is when unchanged: encoding 20,000 entries again
    would cost more than the rest, and streaming keeps memory flat."""
    new_ids = iter(sorted(updates))
    next_new = next(new_ids, None)
    last = None
    for entry, line in existing:
        sound_id = int(entry["id"])
        while next_new is not None and next_new < sound_id:
            if next_new not in removed:
                credits.append(credit_of(updates[next_new]))
                yield metadata_line(updates[next_new])
            next_new = next(new_ids, None)
        if sound_id == last or sound_id in removed:
            continue
        last = sound_id
        if sound_id == next_new:
            entry = {**entry, **updates[sound_id]}
            line = metadata_line(entry)
            next_new = next(new_ids, None)
        credits.append(credit_of(entry))
        yield line
    for sound_id in ([next_new] if next_new is not None else []) + list(new_ids):
        if sound_id not in removed:
            credits.append(credit_of(updates[sound_id]))
            yield metadata_line(updates[sound_id])


def credit_of(entry: dict) -> dict:
    """What ATTRIBUTION.txt needs of an entry."""
    return {key: entry.get(key) for key in ("id", "name", "username", "license_name")}


def journal_updates(lines: Iterable[bytes]) -> dict[int, dict]:
    """The entries a metadata journal records, later lines merged over earlier ones; a line
    torn by a crash (the last one, mid-append) is skipped: its sound is adopted by md5."""
    updates: dict[int, dict] = {}
    for raw in lines:
        try:
            entry = json.loads(raw)
            sound_id = int(entry["id"])
        except (ValueError, KeyError, TypeError):
            continue
        updates[sound_id] = {**updates.get(sound_id, {}), **entry}
    return updates


def metadata_line(entry: dict) -> str:
    """One sound's line of metadata.json (the C encoder: `indent` would force the slow one)."""
    return "  " + json.dumps(entry, ensure_ascii=False, sort_keys=True)


def metadata_text(lines: Iterable[str]) -> str:
    """metadata.json: a JSON array with one sound per line, readable and diff-friendly."""
    return "".join(metadata_chunks(lines))


def metadata_chunks(lines: Iterable[str]) -> Iterator[str]:
    """metadata_text() a line at a time."""
    yield "["
    for number, line in enumerate(lines):
        yield ("\n" if number == 0 else ",\n") + line
    yield "\n]\n"


def attribution_line(entry: dict) -> str:
    return (f'"{entry.get("name")}" by {entry.get("username")} '
            f'({SITE_SOUND_URL.format(sound_id=entry["id"])}) licensed under {entry.get("license_name")}')


ATTRIBUTION_HEADER = """\
Sounds downloaded from Freesound (https://freesound.org), grouped by licence.

CC BY (Attribution), CC BY-NC (Attribution NonCommercial) and Sampling+ sounds
require credit: copy the lines below into your credits.
CC BY-NC sounds may not be used commercially.
CC0 sounds need no credit, though crediting them is appreciated.
"""


def attribution_text(entries: Sequence[dict]) -> str:
    """ATTRIBUTION.txt: one credit line per sound, grouped by licence."""
    def group_key(name: str) -> tuple[int, str]:
        family = license_family(name)
        return (LICENSE_ORDER.index(family) if family in LICENSE_ORDER else len(LICENSE_ORDER), name)

    groups: dict[str, list[dict]] = {}
    for entry in entries:
        groups.setdefault(entry.get("license_name") or "unknown licence", []).append(entry)
    parts = [ATTRIBUTION_HEADER]
    for name in sorted(groups, key=group_key):
        members = sorted(groups[name], key=lambda entry: int(entry["id"]))
        parts.append(f"\n{name} ({len(members)} sound{'s' if len(members) != 1 else ''})\n")
        parts.extend(attribution_line(entry) + "\n" for entry in members)
    return "".join(parts)


EXCLUDED_IDS_HEADER = ("# Sounds removed from this library with --exclude: no source selects them again.\n"
                       "# Delete a line to allow that sound again. (A file deleted by hand is different:\n"
                       "# the next run downloads it again, as a repair.)")
def excluded_ids_text(old: str | None, added: Iterable[int], now: float) -> str:
    """excluded_ids.txt (a valid ID file) with these sounds appended."""
    text = old if old is not None else EXCLUDED_IDS_HEADER + "\n"
    text += "" if not text or text.endswith("\n") else "\n"
    return text + "".join(f"{sound_id}  # excluded {format_utc(now)}\n" for sound_id in added)


FAILED_IDS_HEADER = (f"# Sounds that could not be downloaded, with the reason. Retry them with:\n"
                     f"#   {PROG} --ids-file failed_ids.txt")


def _line_sound_id(line: str) -> int | None:
    text = strip_comment(line)
    return parse_sound_ref(text) if text else None


def failed_ids_text(text: str, sound_id: int, note: str | None) -> str | None:
    """failed_ids.txt with `sound_id`'s line replaced by `note`, or removed (None).

    Returns None when no sound is left in it: the file can go."""
    lines = [line for line in text.splitlines() if _line_sound_id(line) != sound_id]
    if note is not None:
        lines.append(f"{sound_id}  # {' '.join(note.split())}")
    if not any(_line_sound_id(line) for line in lines):
        return None
    if not text:
        lines.insert(0, FAILED_IDS_HEADER)
    return "\n".join(lines) + "\n"


###############################################################################
# Pure: OAuth2 helpers ########################################################
###############################################################################


def parse_pasted_code(text: str, expected_state: str) -> str:
    """The authorization code from a pasted code or redirect URL; checks `state` on URLs."""
    text = text.strip()
    if "://" not in text and "code=" not in text:
        return text
    query = parse_qs(urlsplit(text).query)
    if "error" in query:
        raise AuthError(f"Freesound refused the authorization: {query['error'][0]}")
    if "code" not in query:
        raise AuthError("the pasted URL has no 'code' parameter; paste the code itself")
    if query.get("state", [None])[0] != expected_state:
        raise AuthError("the pasted URL's state does not match this login; start the login again")
    return query["code"][0]


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorize_url(api_base: str, client_id: str, state: str, challenge: str,
                  redirect_uri: str | None = None) -> str:
    params = {"client_id": client_id, "response_type": "code", "state": state,
              "code_challenge": challenge, "code_challenge_method": "S256"}
    if redirect_uri:
        params["redirect_uri"] = redirect_uri
    return f"{api_base}/oauth2/authorize/?{urlencode(params)}"


def check_redirect_uri(uri: str) -> str:
    """Only http on a loopback host: Freesound accepts any port there (RFC 8252)."""
    parts = urlsplit(uri)
    if parts.scheme != "http" or not is_loopback_host(parts.hostname or ""):
        raise UsageError(f"--redirect-uri must be an http://127.0.0.1/... address, got {uri!r}")
    return uri


def with_port(uri: str, port: int) -> str:
    """The registered loopback URI with the port we actually listen on."""
    parts = urlsplit(uri)
    return parts._replace(netloc=f"{parts.hostname}:{port}").geturl()


###############################################################################
# File I/O: atomic writes, locks, the ledger, the token #######################
###############################################################################


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    write_text_atomic(path, [data], mode)


def write_text_atomic(path: Path, chunks: Iterable[str | bytes], mode: int = 0o644) -> None:
    """write_bytes_atomic for text arriving in pieces (UTF-8): never all in memory at once."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # not on Windows
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def end_torn_line(path: Path) -> None:
    """End a last line torn by a kill -9 mid-append, so that the next line appended to a
    file of lines (the ledger, the metadata journal) stays a line of its own."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")


def write_json_atomic(path: Path, obj: object, mode: int = 0o644) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def iter_metadata(path: Path) -> Iterator[tuple[dict, str]]:
    """metadata.json's entries, each with its line: read a line at a time when the file has
    one sound per line, as this program writes it (memory stays small), else parsed whole."""
    if not path.exists():
        return
    done = 0
    try:
        with path.open(encoding="utf-8") as handle:
            for raw in handle:
                text = raw.strip().rstrip(",")
                if text in ("[", "]", ""):
                    continue
                entry = json.loads(text)
                if not isinstance(entry, dict) or "id" not in entry:
                    raise ValueError("not one entry per line")
                yield entry, "  " + text
                done += 1
        return
    except (ValueError, UnicodeDecodeError):
        pass  # another layout (a teammate's editor, an older version): parse it whole
    for entry in load_metadata(path)[done:]:
        yield entry, metadata_line(entry)


def load_metadata(path: Path) -> list[dict]:
    """metadata.json's entries; refuses (exit 2) rather than risk overwriting a broken file."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e for e in entries):
            raise ValueError("expected a JSON array of objects with an 'id'")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid metadata ({exc}); nothing was written to it: "
                         "fix or move it, then run again") from exc
    return entries


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


class FileLock:
    """An exclusive advisory lock on a file (flock; msvcrt on Windows), across processes.

    The lock file is never deleted: deleting a lock file lets two processes lock two files.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: TextIO | None = None
        self._threads = threading.Lock()  # flock excludes other processes; this, our threads

    def acquire(self, wait: bool) -> bool:
        if not self._threads.acquire(blocking=wait):
            return False
        handle = open(self.path, "a+", encoding="utf-8")
        if not _lock_fd(handle.fileno(), wait):
            handle.close()
            self._threads.release()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the lock
            self._handle = None
            self._threads.release()

    def write_owner(self, text: str) -> None:
        assert self._handle is not None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(text)
        self._handle.flush()

    def read_owner(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            return "unknown"

    @contextlib.contextmanager
    def held(self) -> Iterator[FileLock]:
        self.acquire(wait=True)
        try:
            yield self
        finally:
            self.release()


def _lock_fd(fd: int, wait: bool) -> bool:
    """Lock `fd` exclusively; False if another process holds it and we may not wait."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        while True:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
                return True
            except OSError:
                if not wait:
                    return False
                time.sleep(0.1)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


class Ledger:
    """ledger.jsonl: one line per API request, the memory behind every rate limit.

    Runs sharing a state folder share it: every decision and append happens under
    ledger.lock after reading what other processes appended. A line torn by a crash
    is skipped with a warning, and the file is re-terminated so the next row is whole.
    """

    def __init__(self, path: Path, client_id: str, warn: Callable[[str], None]) -> None:
        self.path, self.client_id, self.warn = path, client_id, warn
        self.lock = FileLock(path.with_name(path.stem + ".lock"))
        self.rows: list[tuple[float, str]] = []
        self._offset, self._line = 0, 0
        self._inode: int | None = None
        with self.locked():
            end_torn_line(self.path)
            self.sync()
            if self._line > LEDGER_COMPACT_ROWS:
                self._compact()

    def locked(self) -> contextlib.AbstractContextManager:
        return self.lock.held()

    def sync(self) -> None:
        """Read the rows appended since last time (all of them if the file was replaced)."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return
        if info.st_ino != self._inode or info.st_size < self._offset:
            self.rows, self._offset, self._inode, self._line = [], 0, info.st_ino, 0
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break  # being written (or torn): read it next time
                self._offset += len(raw)
                self._line += 1
                self._parse(raw)

    def _parse(self, raw: bytes) -> None:
        try:
            row = json.loads(raw)
            if row.get("client_id") == self.client_id:
                self.rows.append((parse_iso(row["at"]), row["kind"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            self.warn(f"skipping unreadable line {self._line} of {self.path}")

    def _compact(self) -> None:
        """Drop rows older than a day, so the file does not grow for ever."""
        cutoff = time.time() - DAY_S
        kept = []
        with self.path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    if parse_iso(json.loads(line)["at"]) > cutoff:
                        kept.append(line)
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
        write_bytes_atomic(self.path, "".join(kept).encode("utf-8"), 0o600)
        self._inode = None
        self.sync()

    def append(self, kind: str, at: float, sound_id: int | None = None) -> None:
        """Add one row; call with the lock held and after sync()."""
        row: dict[str, str | int] = {"at": iso_utc(at), "client_id": self.client_id, "kind": kind}
        if sound_id is not None:
            row["sound_id"] = sound_id
        with self.path.open("ab") as handle:
            handle.write(json.dumps(row).encode("utf-8") + b"\n")
        self.sync()

    def times(self, kind: str | None = None) -> list[float]:
        """When each row of `kind` was added; with no kind, every request (the sounds that
        came inside a pack's zip are downloads, not requests)."""
        return [at for at, row_kind in self.rows if (row_kind == kind if kind else row_kind != PACK_MEMBER)]

    def download_times(self) -> list[float]:
        """What --daily-cap counts: each sound fetched alone or inside a pack's zip."""
        return [at for at, row_kind in self.rows if row_kind in ("download", PACK_MEMBER)]


class TokenStore:
    """token.json: the OAuth2 token response plus expires_at and client_id, mode 0600."""

    def __init__(self, path: Path, client_id: str) -> None:
        self.path, self.client_id = path, client_id

    def load(self, warn: Callable[[str], None]) -> dict | None:
        if not self.path.exists():
            return None
        try:
            token = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(token, dict) or "access_token" not in token:
                raise ValueError("no access_token")
        except (ValueError, UnicodeDecodeError, OSError):
            warn(f"{self.path} is unreadable; a new login is needed")
            return None
        if token.get("client_id") != self.client_id:
            warn(f"{self.path} belongs to another client id; a new login is needed")
            return None
        return token

    def save(self, response: dict, now: float) -> dict:
        keys = ("access_token", "refresh_token", "token_type", "scope", "expires_in")
        token = {key: response[key] for key in keys if key in response}
        token["expires_at"] = now + float(response.get("expires_in") or 0)
        token["client_id"] = self.client_id
        ensure_private_dir(self.path.parent)
        write_json_atomic(self.path, token, mode=0o600)
        return token


CREDENTIALS_NAME = "credentials.json"


def load_credentials(state_dir: Path) -> dict[str, str]:
    """The client id and secret --login stored (mode 0600), or {} if there are none."""
    path = state_dir / CREDENTIALS_NAME
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise UsageError(f"{path} is unreadable ({exc}); run --logout, then --login again") from None
    if not isinstance(stored, dict):
        raise UsageError(f"{path} is not what --login writes; run --logout, then --login again")
    return {key: str(stored[key]) for key in ("client_id", "client_secret") if stored.get(key)}


def save_credentials(state_dir: Path, client_id: str, client_secret: str) -> Path:
    """Keep the credentials a login used, so that cron and systemd need no secrets of their own."""
    ensure_private_dir(state_dir)
    path = state_dir / CREDENTIALS_NAME
    write_json_atomic(path, {"client_id": client_id, "client_secret": client_secret}, mode=0o600)
    return path


def log_out(state_dir: Path) -> list[Path]:
    """Remove the stored token and credentials; returns what was there."""
    removed = []
    for path in (state_dir / "token.json", state_dir / CREDENTIALS_NAME):
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


###############################################################################
# OAuth2: login and refresh ###################################################
###############################################################################


class Auth:
    """Holds the OAuth2 token: loads it, logs in, refreshes (rotating refresh tokens)."""

    def __init__(self, config: Config, store: TokenStore, ui: Ui,
                 read_line: Callable[[], str], clock: Callable[[], float] = time.time) -> None:
        self.config, self.store, self.ui = config, store, ui
        self.read_line, self.clock = read_line, clock
        self.token: dict | None = None
        self.pending_path = store.path.with_name("login-pending.json")
        self._lock = threading.RLock()  # download threads share one token

    @property
    def token_url(self) -> str:
        return f"{self.config.api_base}/oauth2/access_token/"

    def access_token(self) -> str:
        """A usable access token, logging in or refreshing as needed."""
        with self._lock:
            if self.token is None:
                self.token = self.store.load(self.ui.warn)
            if self.token is None:
                self.login()
            elif self._expired(self.token):
                self.refresh(self.token["access_token"])
            assert self.token is not None
            return self.token["access_token"]

    def replaced(self, sent_token: str) -> bool:
        """Whether another worker, or another run sharing the state folder, has already
        replaced `sent_token` (refreshing revokes the old token at once); if so, the
        replacement is what access_token() hands out from now on."""
        with self._lock:
            current = self.store.load(self.ui.warn) or self.token
            if current is None or current["access_token"] == sent_token or self._expired(current):
                return False
            self.token = current
            return True

    def login(self) -> None:
        self.config.check_credentials()
        redirect_uri = None
        if self.config.auth_code:
            code = self.config.auth_code
            verifier = self._pending_verifier()
        elif self.config.redirect_uri:
            code, verifier, redirect_uri = self._loopback_login()
        else:
            code, verifier = self._prompt_for_code()
        self.token = self._token_request("authorization_code", redirect_uri, code=code, code_verifier=verifier)
        self.pending_path.unlink(missing_ok=True)

    def _loopback_login(self) -> tuple[str, str, str]:
        """Open the browser, receive the code on a loopback listener: nothing to copy."""
        import webbrowser

        try:
            receiver = LoopbackReceiver(self.config.redirect_uri or "")
        except OSError as exc:  # the paste flow is the fallback
            self.ui.warn(f"cannot listen for the login on {self.config.redirect_uri} ({exc.strerror}); "
                         "falling back to pasting the code")
            code, verifier = self._prompt_for_code()
            return code, verifier, ""
        with receiver:
            state = secrets.token_urlsafe(16)
            verifier, challenge = pkce_pair()
            url = authorize_url(self.config.api_base, self.config.client_id or "", state, challenge,
                                receiver.redirect_uri)
            self.ui.prompt(f"Log in to Freesound in your browser (opening it now). If it does not open, "
                           f"open this URL:\n  {url}\nwaiting up to {LOGIN_TIMEOUT_S // 60:.0f} minutes...\n")
            webbrowser.open(url)
            query = receiver.wait(LOGIN_TIMEOUT_S)
        return parse_pasted_code("http://x/?" + urlencode(query), state), verifier, receiver.redirect_uri

    def refresh(self, stale_access_token: str) -> None:
        """Replace `stale_access_token`, under token.lock and once for everyone.

        Refresh tokens rotate: a second refresh with the same one fails, and a later one
        revokes the access token the first handed out. So whoever comes second (a thread,
        or another run sharing the state folder) takes the token the first one saved."""
        with self._lock:
            with FileLock(self.store.path.with_name("token.lock")).held():
                current = self.store.load(self.ui.warn) or self.token or {}
                if current.get("access_token") != stale_access_token and not self._expired(current):
                    self.token = current
                    return
                try:
                    if current.get("refresh_token"):
                        self.token = self._token_request("refresh_token", refresh_token=current["refresh_token"])
                        return
                except LoginExpired as exc:
                    self.ui.warn(f"{exc}; a new login is needed")
            self.token = None
            self.login()

    def _expired(self, token: dict) -> bool:
        """Expired, or about to: refreshed a little early, by at most a quarter of its life."""
        margin = min(TOKEN_EXPIRY_MARGIN_S, float(token.get("expires_in") or DAY_S) / 4)
        return token.get("expires_at", 0) - margin < self.clock()

    def _prompt_for_code(self) -> tuple[str, str]:
        state = secrets.token_urlsafe(16)
        verifier, challenge = pkce_pair()
        ensure_private_dir(self.pending_path.parent)
        write_json_atomic(self.pending_path, {"state": state, "code_verifier": verifier,
                                              "created_at": self.clock()}, mode=0o600)
        url = authorize_url(self.config.api_base, self.config.client_id or "", state, challenge)
        self.ui.prompt("Log in to Freesound: open this URL in a browser, authorize the app,\n"
                       f"then paste the code (or the whole URL you land on) here:\n  {url}\ncode: ")
        line = self.read_line()
        if not line.strip():
            raise AuthError(f"no authorization code was entered; run `{PROG} --login` in a terminal "
                            "(or pass --auth-code CODE)")
        return parse_pasted_code(line, state), verifier

    def _pending_verifier(self) -> str | None:
        """The PKCE verifier of the URL we printed last, so --auth-code works in a later run."""
        try:
            pending = json.loads(self.pending_path.read_text(encoding="utf-8"))
            return pending["code_verifier"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _token_request(self, grant_type: str, redirect_uri: str | None = None, **params: str | None) -> dict:
        """POST to the token endpoint and save what it answers (token.json, at once)."""
        from oauthlib.oauth2 import OAuth2Error
        from requests_oauthlib import OAuth2Session

        if urlsplit(self.token_url).scheme == "http":  # loopback only, checked by check_api_base
            os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"
        session = OAuth2Session(client_id=self.config.client_id, redirect_uri=redirect_uri or None)
        session.headers["User-Agent"] = USER_AGENT
        extra: dict[str, Any] = {key: value for key, value in params.items() if value}
        extra["timeout"] = (min(CONNECT_TIMEOUT_S, self.config.timeout), self.config.timeout)
        try:
            if grant_type == "refresh_token":
                response = session.refresh_token(self.token_url, client_id=self.config.client_id,
                                                 client_secret=self.config.client_secret, **extra)
            else:
                response = session.fetch_token(self.token_url, client_secret=self.config.client_secret,
                                               include_client_id=True, **extra)
        except OAuth2Error as exc:
            if exc.error == "invalid_grant" and grant_type == "refresh_token":
                raise LoginExpired("the saved login has expired or was revoked") from None
            raise AuthError(_oauth_error_message(str(exc.error), grant_type)) from None
        except OSError as exc:  # requests' errors are OSErrors
            raise AuthError(f"could not reach the Freesound token endpoint: {type(exc).__name__}") from None
        return self.store.save(dict(response), self.clock())


class LoopbackReceiver:
    """A one-shot HTTP listener on 127.0.0.1 for the authorization redirect."""

    def __init__(self, registered_uri: str) -> None:
        from http.server import BaseHTTPRequestHandler, HTTPServer

        parts, received, done = urlsplit(registered_uri), {}, threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                if urlsplit(self.path).path != (parts.path or "/") or not ({"code", "error"} & set(query)):
                    self.send_error(404)
                    return
                received.update({key: values[0] for key, values in query.items()})
                body = b"<p>Freesound login received. You can close this tab.</p>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                done.set()

            def log_message(self, *args) -> None:
                pass

        self.server = HTTPServer((parts.hostname or "127.0.0.1", parts.port or 0), Handler)
        self.redirect_uri = with_port(registered_uri, self.server.server_address[1])
        self._received, self._done = received, done
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float) -> dict:
        if not self._done.wait(timeout_s):
            raise AuthError(f"no login arrived within {timeout_s / 60:g} minutes; run --login again, "
                            "or leave out --redirect-uri to paste the code instead")
        return dict(self._received)

    def __enter__(self) -> LoopbackReceiver:
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()


def _oauth_error_message(error: str, grant_type: str) -> str:
    if error == "invalid_client":
        return (f"Freesound rejected the client id or secret ({ENV_CLIENT_ID} / {ENV_CLIENT_SECRET}); "
                f"check them on {CREDENTIALS_PAGE}")
    if error == "invalid_grant" and grant_type == "authorization_code":
        return ("Freesound rejected the authorization code (codes last 10 minutes and work once); "
                f"run `{PROG} --login` again")
    return f"Freesound's token endpoint answered {error!r} to a {grant_type} request"


###############################################################################
# HTTP: the limits and the one choke point ####################################
###############################################################################


class Limits:
    """Keeps this credential inside --rate/--daily-cap and --api-rate/--api-daily-cap.

    Every request is judged from the ledger, so the limits hold across runs. Every wait
    ends early when the run decides to stop (`stop` is set: a daily limit, a fatal error,
    Ctrl-C), and then no request starts: acquire() and pause() raise Stopped instead.
    """

    def __init__(self, config: Config, ledger: Ledger, ui: Ui, stop: threading.Event,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.ledger, self.ui, self.stop, self.clock = config, ledger, ui, stop, clock
        self._last_preview: float | None = None
        self._preview_lock = threading.Lock()

    def window(self) -> Window:
        with self.ledger.locked():
            self.ledger.sync()
        return window_of(self.ledger.download_times(), self.ledger.times(), self.clock(),
                         self.config.daily_cap, self.config.api_daily_cap)

    def acquire(self, kind: str, sound_id: int | None, members: Sequence[int] = ()) -> None:
        """Wait for a slot, then record the request in the ledger (retries count too), and
        a pack's `members` as downloads."""
        while True:
            self.check_stop()
            wait = self._take_slot(kind, sound_id, members)
            if wait <= 0:
                return
            if wait >= 5:
                self.ui.info(f"waiting {wait:.0f} s for the rate limit (until {format_utc(self.clock() + wait)})")
            self.pause(wait)

    def pause(self, seconds: float) -> None:
        """Sleep, unless and until the run decides to stop."""
        if self.stop.wait(seconds):
            raise Stopped()

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()

    def _take_slot(self, kind: str, sound_id: int | None, members: Sequence[int]) -> float:
        """Record the request and return 0 if it may start now, else how long to wait.

        Decided under the ledger lock, so runs sharing the state folder share the limits.
        Previews do not count against the API's limits, but are paced at --rate all the same."""
        if kind == "preview":
            with self._preview_lock:
                now = self.clock()
                wait = pacing_delay(self._last_preview, self.config.download_interval_s, now)
                if wait <= 0:
                    self._last_preview = now
                return wait
        with self.ledger.locked():
            self.ledger.sync()
            self._check_daily(kind, max(1, len(members)))
            now = self.clock()
            wait = self._wait_needed(kind, now)
            if wait <= 0:
                self.ledger.append(kind, now, None if kind == "pack" else sound_id)
                for member in members:
                    self.ledger.append(PACK_MEMBER, now, member)
            return wait

    def _check_daily(self, kind: str, sounds: int) -> None:
        """Raise DailyLimitReached if this request (bringing `sounds` sounds, if it is a
        download) would break a rolling 24-hour cap."""
        now, config = self.clock(), self.config
        caps = [("the API daily cap", self.ledger.times(), config.api_daily_cap, 1)]
        if kind in ("download", "pack"):
            caps.insert(0, ("the daily download cap", self.ledger.download_times(), config.daily_cap, sounds))
        for label, times, cap, needed in caps:
            if len(times_in_window(times, now, DAY_S)) + needed > cap:
                frees = window_frees_at(times, max(1, cap - needed + 1), now, DAY_S)
                raise DailyLimitReached(f"{label} ({cap} requests per 24 hours)",
                                        dt.datetime.fromtimestamp(frees, dt.UTC))

    def _wait_needed(self, kind: str, now: float) -> float:
        per_minute = max(1, int(self.config.api_rate))
        wait = window_frees_at(self.ledger.times(), per_minute, now, MINUTE_S) - now
        if kind in ("download", "pack"):
            starts = self.ledger.download_times()
            wait = max(wait, pacing_delay(max(starts) if starts else None,
                                          self.config.download_interval_s, now))
        return wait

    def minute_frees_in(self, server_limit: int | None) -> float:
        """Seconds until our own ledger's minute window is under the server's limit."""
        now = self.clock()
        limit = server_limit or max(1, int(self.config.api_rate))
        return window_frees_at(self.ledger.times(), limit, now, MINUTE_S) - now

    def day_frees_estimate(self) -> dt.datetime:
        """After a server 429 (N/day): our oldest request in the window leaving is the best guess."""
        now = self.clock()
        inside = times_in_window(self.ledger.times(), now, DAY_S)
        return dt.datetime.fromtimestamp((inside[0] if inside else now) + DAY_S, dt.UTC)


class ApiSession:
    """The one place where HTTP becomes our errors.

    Every request, the freesound client's included (it is handed this object as its
    session), passes through send(): it is kept to the API's origin, paced and recorded,
    authenticated right before it goes out (API key for metadata, OAuth2 bearer for
    downloads and /me/), given a timeout, and its answer is judged by decide(). A body
    read through iter_body() turns a dropped connection into NetworkError as well. One
    requests.Session underneath keeps connections alive between calls.
    """

    def __init__(self, config: Config, limits: Limits, auth: Auth, ui: Ui) -> None:
        import requests

        self.config, self.limits, self.oauth, self.ui = config, limits, auth, ui
        self.http = requests.Session()
        self.http.headers["User-Agent"] = USER_AGENT
        self.http.headers["Accept"] = "application/json, */*"
        # One pool for the API's single host, with a connection for every concurrent download.
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(10, config.jobs + 2))
        self.http.mount("https://", adapter)
        self.http.mount("http://", adapter)

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        """What the freesound client calls before send()."""
        return self.http.prepare_request(request)

    def get(self, url: str, headers: dict | None = None, stream: bool = False,
            preview: bool = False, members: Sequence[int] = ()) -> requests.Response:
        import requests

        return self.send(self.http.prepare_request(requests.Request("GET", url, headers=headers)),
                         stream=stream, preview=preview, members=members)

    def send(self, request: requests.PreparedRequest, preview: bool = False, members: Sequence[int] = (),
             **kwargs) -> requests.Response:
        """Send through every rule above. A `preview` is public: it goes without credentials,
        to whatever https host serves previews, and is paced but not counted by the API. A
        pack's zip brings `members`, each counted as a download on the first try."""
        url = request.url or ""
        self._check_destination(url, preview)
        kind, sound_id = ("preview", None) if preview else classify_request(url, self.config.api_base)
        kwargs.update(allow_redirects=False, timeout=(min(CONNECT_TIMEOUT_S, self.config.timeout),
                                                       self.config.timeout))
        refreshed = False
        for number in itertools.count(1):
            self.limits.acquire(kind, sound_id, members if number == 1 else ())
            token = None if preview else self._authenticate(request, url)  # after the wait, never before
            self.limits.check_stop()
            response, answer = self._exchange(request, kind, kwargs)
            replaced = token is not None and answer.token_rejected and self.oauth.replaced(token)
            attempt = Attempt(url, kind, number, bearer=token is not None, token_replaced=replaced,
                              refreshed=refreshed)
            throttle_wait = self.limits.minute_frees_in(throttle_limit(answer.detail)) if answer.status == 429 else 0
            decision = decide(answer, attempt, self.config.retries,
                              backoff_delay(number, self.config.backoff, random.random()), throttle_wait)
            if decision.step is Step.RETURN and response is not None:
                return response
            if response is not None:
                response.close()
            if decision.step is Step.RAISE and decision.error is not None:
                raise decision.error
            if decision.step is Step.DAY_LIMIT:
                raise DailyLimitReached(decision.note, self.limits.day_frees_estimate())
            if decision.step is Step.RETRY:
                self.ui.info(decision.note)
                self.limits.pause(decision.delay_s)
            if decision.step is Step.REFRESH and token is not None:
                refreshed = True
                self.oauth.refresh(token)
            # RESEND needs nothing more: the next turn attaches the current token.
        raise AssertionError("unreachable: the loop returns or raises")

    def iter_body(self, response: requests.Response, chunk_size: int) -> Iterator[bytes]:
        """The response body in chunks; a connection lost mid-body is a NetworkError."""
        import requests

        try:
            yield from response.iter_content(chunk_size)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            raise NetworkError(response.url, f"connection lost mid-download ({type(exc).__name__})") from None

    def _exchange(self, request: requests.PreparedRequest, kind: str,
                  kwargs: dict) -> tuple[requests.Response | None, Answer]:
        import requests

        try:
            response = self.http.send(request, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            return None, Answer(0, f"network error: {type(exc).__name__}")
        return response, answer_of(response, kind, self.limits.clock())

    def _check_destination(self, url: str, preview: bool) -> None:
        """Credentials go to the API's own origin only; previews go to https hosts only."""
        if not preview and origin(url) != origin(self.config.api_base):
            raise ApiError(0, url, "refusing to send credentials to a host other than the API's")
        scheme, host, _ = origin(url)
        if preview and scheme != "https" and not (scheme == "http" and is_loopback_host(host)):
            raise ApiError(0, url, "refusing a preview URL that is not https")

    def _authenticate(self, request: requests.PreparedRequest, url: str) -> str | None:
        """Set the Authorization header: OAuth2 where the API demands it (returning the token
        sent), else the API key."""
        self.config.check_credentials()
        if needs_oauth(url, self.config.api_base):
            token = self.oauth.access_token()
            request.headers["Authorization"] = f"Bearer {token}"
            return token
        request.headers["Authorization"] = f"Token {self.config.client_secret}"
        return None


def answer_of(response: requests.Response, kind: str, now: float) -> Answer:
    """What decide() needs to know of a response; the body is read only for an error."""
    status, headers = response.status_code, response.headers
    is_json = "json" in headers.get("Content-Type", "")
    if status < 300 and (is_json or kind != "api"):
        return Answer(status, is_json=is_json)
    return Answer(status, response_detail(response), is_json=is_json,
                  location=headers.get("Location", "") if response.is_redirect else None,
                  token_rejected='error="invalid_token"' in headers.get("WWW-Authenticate", ""),
                  retry_after_s=parse_retry_after(headers.get("Retry-After"), now))


def response_detail(response: requests.Response) -> str:
    """The API's JSON `detail`, or a short description of whatever came instead."""
    try:
        body = response.json()
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])
    except ValueError:
        pass
    content_type = response.headers.get("Content-Type", "unknown type").split(";")[0]
    return f"unexpected {content_type} response (not Freesound's JSON; a proxy error?)"


###############################################################################
# Freesound client, and streaming a download to disk ##########################
###############################################################################


class Api:
    """Searches through MTG's freesound client, downloads through the same session."""

    def __init__(self, config: Config, session: ApiSession) -> None:
        import freesound

        # The client reads its base URL from this class attribute, nowhere else.
        freesound.URIS.BASE = config.api_base
        self.config = config
        self.fields = SEARCH_FIELDS + (",previews" if config.previews else "")
        self.session = session
        self.client = freesound.FreesoundClient()
        self.client.session = session

    @staticmethod
    def _call(request: Callable[[], Any], url: str) -> Any:
        """Run a freesound-client call; its only own error left is an unparsable 200 body."""
        import freesound

        try:
            return request()
        except freesound.FreesoundException as exc:
            raise ApiError(exc.code, url, f"{exc.detail} (not Freesound's JSON; a proxy error?)") from None

    def search(self, query: str, filter_: str | None, sort: str | None, **more: Any) -> Iterator[dict]:
        """Every result of a search, following `next` to the end; `more` are further
        parameters (similar_to, similarity_space)."""
        params = {"query": query, "page_size": PAGE_SIZE, "fields": self.fields, **more}
        if filter_ is not None:
            params["filter"] = filter_
        if sort:
            params["sort"] = sort
        search_url = f"{self.config.api_base}/search/text/"
        yield from self._pages(self._call(lambda: self.client.text_search(**params), search_url))

    def list_sounds(self, path: str, what: str) -> Iterator[dict]:
        """A pack's, a user's or a bookmark category's sounds, with every field in the same call."""
        import freesound

        url = f"{self.config.api_base}{path}"
        params = {"page_size": PAGE_SIZE, "fields": self.fields}
        try:
            first = self._call(lambda: freesound.FSRequest.request(url, params, self.client, freesound.Pager), url)
        except NotFound:
            raise UsageError(f"{what} not found on Freesound") from None
        yield from self._pages(first)

    def bookmark_categories(self) -> list[dict]:
        import freesound

        url = f"{self.config.api_base}/me/bookmark_categories/"
        pager = self._call(lambda: freesound.FSRequest.request(url, {"page_size": PAGE_SIZE}, self.client,
                                                               freesound.Pager), url)
        return list(self._pages(pager))

    def _pages(self, pager) -> Iterator[dict]:
        while True:
            # Not `for sound in pager`: that wraps each result, and results can be null.
            yield from (sound for sound in pager.results if sound)
            if not pager.next:
                return
            try:
                pager = self._call(pager.next_page, pager.next)
            except NotFound:  # a page past the last one: the end
                return

    def sounds_by_id(self, sound_ids: Sequence[int], look_up_missing: bool = True) -> tuple[list[dict], list[int]]:
        """Metadata in batches of 150 (one search each); returns (sounds, ids that do not exist).
        A sound the search does not know is looked up alone, unless not `look_up_missing`."""
        found: dict[int, dict] = {}
        for batch in batched(sound_ids, PAGE_SIZE):
            for sound in self.search("", id_filter(batch), None):
                found[int(sound["id"])] = sound
        missing = [i for i in sound_ids if i not in found]
        if look_up_missing:
            missing = [i for i in missing if not self._look_up(i, found)]
        return [found[i] for i in sound_ids if i in found], missing

    def _look_up(self, sound_id: int, found: dict[int, dict]) -> bool:
        """One sound's metadata into `found`; False if it does not exist."""
        url = f"{self.config.api_base}/sounds/{sound_id}/"
        try:
            found[sound_id] = self._call(
                functools.partial(self.client.get_sound, sound_id, fields=self.fields), url).as_dict()
        except NotFound:
            return False
        return True

    def open_download(self, sound: dict, offset: int, preview: str | None = None) -> requests.Response:
        sound_id = int(sound["id"])
        url = preview_url(sound, preview) if preview else f"{self.config.api_base}/sounds/{sound_id}/download/"
        if not url:
            raise DownloadError(sound_id, f"Freesound lists no {preview} preview for it")
        return self._open(url, sound_id, offset, preview=bool(preview))

    def open_pack(self, pack_id: int, offset: int, members: Sequence[int]) -> requests.Response:
        """A pack's zip of originals; `members` are counted as downloads when it starts."""
        return self._open(f"{self.config.api_base}/packs/{pack_id}/download/", pack_id, offset, members=members)

    def _open(self, url: str, item_id: int, offset: int, **send: Any) -> requests.Response:
        headers = {"Accept-Encoding": "identity"}  # byte counts must match the file
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            return self.session.get(url, headers=headers, stream=True, **send)
        except NotFound as exc:
            raise DownloadError(item_id, f"not available for download ({exc.detail})") from None
        except Unavailable as exc:  # another sound may fare better; auth, https, redirects would not
            raise DownloadError(item_id, f"HTTP {exc.status or 'error'}: {exc.detail}") from None


_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def resumed_offset(status: int, content_range: str | None, offset: int, size: int) -> int:
    """Where the body starts: `offset` for a valid 206, 0 for a 200 (server ignored Range).

    RFC 9110 §14.4: a 206 must say `bytes <first>-<last>/<complete length>`; we asked for
    `bytes=<offset>-`, so first must be our offset and the length the sound's size.
    """
    if status != 206:
        return 0
    match = _CONTENT_RANGE_RE.fullmatch((content_range or "").strip())
    if (not match or int(match.group(1)) != offset
            or (size and match.group(3) != "*" and int(match.group(3)) != size)):
        raise ValueError(f"unexpected Content-Range {content_range!r}")
    return offset


def new_md5() -> hashlib._Hash:
    """md5 for checking files, not for security: FIPS builds refuse it otherwise."""
    return hashlib.md5(usedforsecurity=False)


def hash_file(path: Path) -> hashlib._Hash:
    digest = new_md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_SIZE_BYTES), b""):
            digest.update(chunk)
    return digest


def download_to(api: Api, sound: dict, dest: Path, ui: Ui | _SlotUi,
                stop: threading.Event | None = None, preview: str | None = None) -> tuple[Path, str]:
    """Stream one original (or preview) to `<dest>.part`; an original's size and md5 are
    checked against its metadata. Returns the .part and the md5 of what arrived."""
    size = 0 if preview else int(sound.get("filesize") or 0)  # the metadata describes the original
    part, md5_hex = stream_to_part(lambda offset: api.open_download(sound, offset, preview), api.session,
                                   dest, size, int(sound["id"]), ui, stop)
    if not preview:
        _verify(sound, part, md5_hex)
    return part, md5_hex


def stream_to_part(open_at: Callable[[int], requests.Response], session: ApiSession, dest: Path, size: int,
                   item_id: int, ui: Ui | _SlotUi, stop: threading.Event | None = None,
                   hashed: bool = True) -> tuple[Path, str]:
    """Stream a body to `<dest>.part`, resuming what an earlier try left there with Range
    (`open_at(offset)` sends the request). Returns the .part and the md5 of all of it
    ("" unless `hashed`: a pack's zip is checked member by member instead)."""
    part = dest.with_name(dest.name + PART_SUFFIX)
    offset = part.stat().st_size if part.exists() else 0
    if size and offset > size:
        part.unlink()
        offset = 0
    with open_at(offset) as response:
        if response.status_code == 416:  # nothing left to send: the .part may be whole
            if not offset:
                raise DownloadError(item_id, "the server refused the download (416)")
            md5_hex = hash_file(part).hexdigest() if hashed else ""
        else:
            if response.headers.get("Content-Type", "").startswith("text/html"):
                raise DownloadError(item_id, "got an HTML page instead of the file")
            try:
                offset = resumed_offset(response.status_code, response.headers.get("Content-Range"),
                                        offset, size)
            except ValueError as exc:
                part.unlink(missing_ok=True)  # start over rather than trust what we have
                raise CorruptDownload(item_id, str(exc)) from None
            chunks = session.iter_body(response, CHUNK_SIZE_BYTES)
            if not hashed:
                _write_body(chunks, part, offset, None, size, ui, dest.name, stop)
                return part, ""
            # Hash while streaming; only a resumed file's existing bytes are read back.
            with BackgroundMd5(hash_file(part) if offset else new_md5()) as hasher:
                _write_body(chunks, part, offset, hasher, size, ui, dest.name, stop)
            md5_hex = hasher.hexdigest()
    return part, md5_hex


class BackgroundMd5:
    """md5 on a helper thread, fed chunk by chunk as they are written.

    hashlib lets go of the GIL on large buffers, so hashing overlaps reading the socket
    and writing the disk instead of adding to them: on a 1 GiB loopback download that is
    the difference between 1.45x and ~1.1x curl's wall time (bench/run.py). The queue is
    bounded, so memory stays at a few chunks whatever the file size.
    """

    def __init__(self, digest: hashlib._Hash) -> None:
        import queue

        self._digest = digest
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=4)  # 4 chunks at most
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self._finish()
        return self._digest.hexdigest()

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> BackgroundMd5:
        return self

    def __exit__(self, *exc_info) -> None:
        self._finish()  # never leave the thread waiting, whatever went wrong


def _write_body(chunks: Iterable[bytes], part: Path, offset: int, digest: BackgroundMd5 | hashlib._Hash | None,
                size: int, ui: Ui | _SlotUi, label: str, stop: threading.Event | None = None) -> None:
    with part.open("ab" if offset else "wb") as handle, ui.file_progress(label, size, offset) as bar:
        for chunk in chunks:
            if stop is not None and stop.is_set():
                raise Stopped()
            try:
                handle.write(chunk)
            except OSError as exc:  # disk full, quota, folder gone: nothing later can succeed
                handle.close()
                part.unlink(missing_ok=True)
                raise UsageError(f"cannot write {part}: {exc.strerror or exc}; the files and metadata "
                                 "downloaded so far are kept") from None
            if digest is not None:
                digest.update(chunk)
            bar(len(chunk))


_MEMBER_ID_RE = re.compile(r"(\d+)__")


def unpack_pack(archive: Path, pack_id: int, sounds: Sequence[dict], folder: Path, ui: Ui | _SlotUi,
                jobs: int = 1) -> tuple[list[tuple[dict, Path]], dict[int, str]]:
    """Copy each sound out of a pack's zip to `<its file name>.part` in `folder`, checked
    against the listing's size and md5, `jobs` at a time (md5 is most of the work, and
    hashlib runs outside the GIL). A member is found by the sound id its name starts with
    (`<id>__<user>__<name>.<type>`); its name is never used as a path. Returns the verified
    (sound, .part) pairs in `sounds`' order and, for the rest, why."""
    import zipfile
    from concurrent.futures import ThreadPoolExecutor

    try:
        opened = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise CorruptDownload(pack_id, f"the pack's zip is damaged ({exc})") from None
    with opened, ThreadPoolExecutor(max_workers=jobs) as pool:
        members = {int(m.group(1)): info for info in opened.infolist()
                   if (m := _MEMBER_ID_RE.match(info.filename))}
        failures = list(pool.map(lambda sound: _unpack_member(opened, members.get(int(sound["id"])), sound,
                                                              folder, ui), sounds))
    verified = [(sound, folder / (sound_filename(sound) + PART_SUFFIX))
                for sound, failure in zip(sounds, failures, strict=True) if failure is None]
    failed = {int(sound["id"]): failure for sound, failure in zip(sounds, failures, strict=True) if failure}
    return verified, failed


def _unpack_member(opened: zipfile.ZipFile, member: zipfile.ZipInfo | None, sound: dict, folder: Path,
                   ui: Ui | _SlotUi) -> str | None:
    """One sound out of the zip into its .part; None when it checks out, else why not."""
    import zipfile

    if member is None:
        return "missing from the pack's zip"
    part = folder / (sound_filename(sound) + PART_SUFFIX)
    digest = new_md5()
    try:
        with opened.open(member) as source:
            _write_body(iter(lambda: source.read(CHUNK_SIZE_BYTES), b""), part, 0, digest,
                        int(sound.get("filesize") or 0), ui, part.name)
        _verify(sound, part, digest.hexdigest())
    except CorruptDownload as exc:
        return exc.reason
    except zipfile.BadZipFile as exc:  # a CRC that does not match, a truncated member
        part.unlink(missing_ok=True)
        return f"damaged in the pack's zip ({exc})"
    return None


def _verify(sound: dict, part: Path, md5_hex: str) -> None:
    sound_id, size = int(sound["id"]), int(sound.get("filesize") or 0)
    actual = part.stat().st_size
    if size and actual != size:
        part.unlink()
        raise CorruptDownload(sound_id, f"size mismatch: got {actual} bytes, expected {size}")
    expected_md5 = (sound.get("md5") or "").lower()
    if expected_md5 and md5_hex != expected_md5:
        part.unlink()
        raise CorruptDownload(sound_id, "md5 mismatch: the file was corrupted in transit")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM for the length of the block, so that a finished file and its
    metadata entry land together; the signal is delivered as soon as the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda number, frame: pending.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])


###############################################################################
# Progress and messages #######################################################
###############################################################################


class Ui:
    """Everything the user reads: progress bars on a terminal, plain lines otherwise."""

    def __init__(self, stream=sys.stderr, quiet: bool = False, bars: bool | None = None) -> None:
        self.stream, self.quiet = stream, quiet
        self.bars = (stream.isatty() if bars is None else bars) and not quiet
        self.overall: Any = None  # the tqdm bar of the whole run

    def _write(self, text: str) -> None:
        if self.overall is not None:
            from tqdm import tqdm
            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def info(self, text: str) -> None:
        if not self.quiet:
            self._write(text)

    def warn(self, text: str) -> None:
        self._write(f"{PROG}: warning: {text}")

    def prompt(self, text: str) -> None:
        print(text, end="", file=self.stream, flush=True)

    def start(self, total: int) -> None:
        if self.bars and total:
            from tqdm import tqdm
            self.overall = tqdm(total=total, unit="sound", file=self.stream, position=0)

    def advance(self) -> None:
        if self.overall is not None:
            self.overall.update(1)

    def finish(self) -> None:
        if self.overall is not None:
            self.overall.close()
            self.overall = None

    def file_progress(self, label: str, size: int, initial: int, line: int = 1):
        return _FileProgress(self, label, size, initial, line)

    def slot(self, number: int) -> _SlotUi:
        """The view of this Ui for download slot `number`: its file bar gets a line of its own."""
        return _SlotUi(self, 1 + number)


@dataclasses.dataclass
class _SlotUi:
    ui: Ui
    line: int

    def file_progress(self, label: str, size: int, initial: int):
        return self.ui.file_progress(label, size, initial, self.line)


class _FileProgress:
    def __init__(self, ui: Ui, label: str, size: int, initial: int, line: int) -> None:
        self.ui, self.label, self.size, self.initial, self.line = ui, label, size, initial, line
        self.bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if self.ui.bars:
            from tqdm import tqdm
            self.bar = tqdm(total=self.size or None, initial=self.initial, desc=self.label[:40],
                            unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                            file=self.ui.stream, position=self.line)
            return self.bar.update
        return lambda n: None

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()


###############################################################################
# Orchestration: the library folder, connect, select, download ################
###############################################################################


class Library:
    """The output folder: audio files, metadata.json, ATTRIBUTION.txt and their journal.

    A download is recorded by appending its entry to a journal, fsynced: a cost that does
    not grow with the library. The journal is folded into metadata.json and ATTRIBUTION.txt
    (each replaced atomically) at least every FOLD_EVERY_S, whenever the run lets go of the
    folder (at every exit: 0, 1, 2, 4, 130, 143), and by the next run after a kill -9, so a
    recorded sound is never lost and the two files are always whole. Only what `has()` needs
    is kept in memory, not the entries.
    """

    LOCK_NAME = ".freesound-downloader.lock"
    FAILED_NAME = "failed_ids.txt"
    EXCLUDED_NAME = "excluded_ids.txt"
    JOURNAL_NAME = ".metadata-journal.jsonl"
    FOLD_EVERY_S = 30.0

    def __init__(self, folder: Path, sidecars: bool = False) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the output folder {folder}: {exc.strerror}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"the output folder {folder} is not writable")
        self.folder = folder
        self.metadata_path = folder / "metadata.json"
        self.journal_path = folder / self.JOURNAL_NAME
        self.lock = FileLock(folder / self.LOCK_NAME)
        self.sidecars = sidecars
        self.failed_path = folder / self.FAILED_NAME
        self.excluded_path = folder / self.EXCLUDED_NAME
        self.excluded: set[int] = set()
        self._write_lock = threading.Lock()  # one metadata writer, whatever --jobs is
        self._journal: BinaryIO | None = None
        self._folded_at = time.monotonic()
        self.held: dict[int, Held] = {}
        self.pending: dict[int, dict] = {}  # recorded in the journal, not yet in metadata.json
        self.removed: set[int] = set()      # to be dropped from metadata.json at the next fold
        self.in_order = True                # metadata.json is sorted by id, as we write it

    def load(self) -> Library:
        """Read what the folder holds (locked() does it too, once it holds the lock)."""
        self.held, self.pending, self.in_order = read_library(self.folder)
        self.removed = set()
        try:
            self.excluded = set(parse_id_lines(self.excluded_path.read_text(encoding="utf-8").splitlines(),
                                               str(self.excluded_path)))
        except FileNotFoundError:
            self.excluded = set()
        return self

    def exclude(self, sound_ids: Sequence[int], now: float) -> list[str]:
        """Out for good: listed in excluded_ids.txt first (a crash midway still keeps them
        out), then dropped from metadata.json, then their files deleted. Returns the files."""
        added = [i for i in dict.fromkeys(sound_ids) if i not in self.excluded]
        if added:
            old = self.excluded_path.read_text(encoding="utf-8") if self.excluded_path.exists() else None
            write_bytes_atomic(self.excluded_path, excluded_ids_text(old, added, now).encode("utf-8"))
            self.excluded.update(added)
        files = [str(self.held[i][0]) for i in sound_ids if i in self.held and self.held[i][0]]
        with self._write_lock:
            self.removed.update(i for i in sound_ids if i in self.held)
            self._fold()
            for sound_id in sound_ids:
                self.held.pop(sound_id, None)
                self._update_failed(sound_id, None)
        removed = []
        for name in (Path(file).name for file in files):
            if (self.folder / name).exists():
                removed.append(name)
            for path in (self.folder / name, self.folder / f"{name}.json", self.folder / (name + PART_SUFFIX)):
                path.unlink(missing_ok=True)
        return removed

    @contextlib.contextmanager
    def locked(self, wait: bool, ui: Ui) -> Iterator[None]:
        """Only one run at a time writes to a folder; a second one exits 2 or waits. The
        journal is folded on the way in (a crashed run's) and on the way out (this run's)."""
        if not self.lock.acquire(wait=False):
            owner = self.lock.read_owner()
            if not wait:
                raise UsageError(f"another run ({owner}) is using {self.folder}; "
                                 "let it finish, or pass --wait-lock to wait for it")
            ui.info(f"waiting for another run ({owner}) to finish with {self.folder}")
            self.lock.acquire(wait=True)
        try:
            self.lock.write_owner(f"pid {os.getpid()} on {socket.gethostname()}, "
                                  f"since {format_utc(time.time())}\n")
            self.load()  # read under the lock: the run we waited for may have added sounds
            for stale in self.folder.glob(".*.tmp"):  # from a run killed mid-write
                stale.unlink(missing_ok=True)
            self.fold()
            yield
        finally:
            self._fold_on_exit(ui)
            self.lock.release()

    def _fold_on_exit(self, ui: Ui) -> None:
        try:
            self.fold()
        except OSError as exc:  # a full disk: the journal still holds every record
            ui.warn(f"could not update {self.metadata_path} ({exc.strerror or exc}); "
                    f"the records are safe in {self.journal_path.name} and the next run adds them")
        finally:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    def has(self, sound_id: int) -> bool:
        """Recorded in metadata.json, and its file is on disk with the recorded size."""
        file, size, _ = self.held.get(sound_id, (None, None, None))
        if not file:
            return False
        try:  # one stat, no Path objects: a run with nothing new asks this of every sound
            found = os.stat(os.path.join(self.folder, os.path.basename(str(file))))
        except OSError:
            return False
        return stat.S_ISREG(found.st_mode) and (size is None or found.st_size == size)

    def adoptable(self, sound: dict, dest: Path) -> bool:
        """A finished file whose metadata was not written (a crash in between): keep it."""
        return local_state(dest.parent, {**sound, "file": dest.name}) is None

    def record(self, sound: dict, file_name: str, now: float) -> None:
        """Record one sound: its entry is appended to the journal and fsynced (about the
        same cost in an empty folder as in a library of 20,000 sounds; bench/run.py)."""
        entry = metadata_entry(sound, file_name, iso_utc(now))
        sound_id = entry["id"]
        with self._write_lock:
            if self._journal is None:
                end_torn_line(self.journal_path)
                self._journal = self.journal_path.open("ab")
            self._journal.write(json.dumps(entry, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self.pending[sound_id] = {**self.pending.get(sound_id, {}), **entry}
            self.held[sound_id] = held_of(entry)
            if self.sidecars:  # for tools that look beside the audio file
                write_json_atomic(self.folder / f"{file_name}.json", {**entry, "attribution": attribution_line(entry)})
            self._update_failed(sound_id, None)
            if time.monotonic() - self._folded_at >= self.FOLD_EVERY_S:
                self._fold()

    def annotate(self, updates: dict[int, dict]) -> None:
        """Merge these keys into recorded entries (an audit's findings), in one fold."""
        with self._write_lock:
            for sound_id, keys in updates.items():
                self.pending[sound_id] = {**self.pending.get(sound_id, {}), **keys, "id": sound_id}
            self._fold()

    def fold(self) -> None:
        """Merge the journal into metadata.json and ATTRIBUTION.txt, then empty it."""
        with self._write_lock:
            self._fold()

    def _fold(self) -> None:
        self._folded_at = time.monotonic()
        if not self.pending and not self.removed:
            return
        existing: Iterable[tuple[dict, str]] = iter_metadata(self.metadata_path)
        if not self.in_order:  # not as we write it (a teammate's editor): sort it once
            existing = sorted(existing, key=lambda pair: int(pair[0]["id"]))
        credits: list[dict] = []
        write_text_atomic(self.metadata_path, metadata_chunks(fold_metadata(existing, self.pending, self.removed,
                                                                            credits)))
        write_bytes_atomic(self.folder / "ATTRIBUTION.txt", attribution_text(credits).encode("utf-8"))
        self.in_order = True
        self.pending, self.removed = {}, set()
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self.journal_path.unlink(missing_ok=True)

    def check_variant(self, preview: str | None) -> None:
        """One folder holds originals or one kind of preview, never a mix under one metadata.json."""
        other = next((held[2] for held in self.held.values() if held[2] != preview), False)
        if other is not False:
            held_kind = f"{other} previews" if other else "originals"
            wanted = f"{preview} previews" if preview else "originals"
            raise UsageError(f"{self.folder} holds {held_kind}; put the {wanted} in another --output-dir")

    def note_failed(self, sound_id: int, reason: str, now: float) -> None:
        """Add (or update) the sound's line in failed_ids.txt, a valid --ids-file."""
        with self._write_lock:
            self._update_failed(sound_id, f"{format_utc(now)}: {reason}")

    def _update_failed(self, sound_id: int, note: str | None) -> None:
        try:
            old = self.failed_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if note is None:
                return
            old = ""
        new = failed_ids_text(old, sound_id, note)
        if new is None:
            self.failed_path.unlink(missing_ok=True)
        elif new != old:
            write_bytes_atomic(self.failed_path, new.encode("utf-8"))


Held = tuple[str | None, int | None, str | None]  # file, filesize, preview: what has() needs


def held_of(entry: dict) -> Held:
    return entry.get("file"), entry.get("filesize"), entry.get("preview")


def read_library(folder: Path) -> tuple[dict[int, Held], dict[int, dict], bool]:
    """What a library folder holds: each recorded sound's file, size and kind (from
    metadata.json and its journal), the journal's entries not yet folded in, and whether
    metadata.json is sorted by id."""
    journal = folder / Library.JOURNAL_NAME
    held: dict[int, Held] = {}
    in_order, last = True, -1
    for entry, _ in iter_metadata(folder / "metadata.json"):
        sound_id = int(entry["id"])
        in_order, last = in_order and sound_id > last, sound_id
        held.setdefault(sound_id, held_of(entry))
    pending: dict[int, dict] = {}
    if journal.exists():
        with journal.open("rb") as lines:
            pending = journal_updates(lines)
    held.update((sound_id, held_of(entry)) for sound_id, entry in pending.items())
    return held, pending, in_order


@dataclasses.dataclass(frozen=True)
class Connection:
    """What every request needs: the ledger-backed limits, the login and the API client.

    connect() builds it without sending anything; credentials are checked when a request
    first needs them. `stop` is the run's one stop decision, which every wait respects."""

    limits: Limits
    auth: Auth
    api: Api
    stop: threading.Event


def connect(config: Config, ui: Ui, read_line: Callable[[], str]) -> Connection:
    ensure_private_dir(config.state_dir)
    client_id = config.client_id or ""
    stop = threading.Event()
    limits = Limits(config, Ledger(config.state_dir / "ledger.jsonl", client_id, ui.warn), ui, stop)
    auth = Auth(config, TokenStore(config.state_dir / "token.json", client_id), ui, read_line)
    return Connection(limits, auth, Api(config, ApiSession(config, limits, auth, ui)), stop)


def select(config: Config, api: Api, library: Library) -> Selection:
    """Resolve the source; sounds already in the library are counted, not fetched, and
    sounds in excluded_ids.txt are left out whatever the source."""
    if config.ids is not None:
        ids = [i for i in config.ids if i not in library.excluded]
        wanted = [i for i in ids if not library.has(i)]
        sounds, missing = api.sounds_by_id(wanted) if wanted else ([], [])
        sounds, changed = (sounds, {}) if config.accept_changed else changed_sounds(sounds, config.pins)
        return Selection(sounds, len(ids), len(ids) - len(wanted), missing, changed,
                         excluded=len(config.ids) - len(ids))
    everything = list(listing(config, api))
    listed = [sound for sound in everything if int(sound["id"]) not in library.excluded]
    new = [sound for sound in listed if not library.has(int(sound["id"]))]
    unique: dict[int, dict] = {}
    for sound in new:  # a sound can come twice across search pages: keep the first
        unique.setdefault(int(sound["id"]), sound)
    return Selection(list(unique.values()), len(listed), len(listed) - len(new), [],
                     excluded=len(everything) - len(listed))


def listing(config: Config, api: Api) -> Iterator[dict]:
    """The sounds of a query, a pack, a user, a bookmark category or a similarity search."""
    if config.pack is not None:
        return api.list_sounds(f"/packs/{config.pack}/sounds/", f"pack {config.pack}")
    if config.user is not None:
        return api.list_sounds(f"/users/{quote(config.user, safe='')}/sounds/", f"user {config.user!r}")
    if config.bookmark_category is not None:
        category = bookmark_category_id(api, config.bookmark_category)
        return api.list_sounds(f"/me/bookmark_categories/{category}/sounds/", f"bookmark category {category}")
    if config.similar_to is not None:
        space = {"similarity_space": config.similarity_space} if config.similarity_space else {}
        return api.search("", config.filter, config.sort, similar_to=config.similar_to, **space)
    return api.search(config.query or "", config.filter, config.sort)


def bookmark_category_id(api: Api, wanted: str) -> int:
    if wanted.isdigit():
        return int(wanted)
    categories = api.bookmark_categories()
    for category in categories:
        if category["name"].casefold() == wanted.casefold():
            return int(category["id"])
    names = ", ".join(repr(c["name"]) for c in categories) or "none"
    raise UsageError(f"no bookmark category named {wanted!r}; yours are: {names}")


def bookmark_categories_text(api: Api) -> str:
    rows = api.bookmark_categories()
    if not rows:
        return "you have no bookmarks"
    return "\n".join(f"{c['id']:>8}  {c['name']} ({c['num_sounds']} sounds)" for c in rows)


def exchange_auth_code(config: Config, conn: Connection, ui: Ui) -> None:
    """A login is not a download, so a dry run exchanges an --auth-code (single-use, 10
    minutes) rather than lose it."""
    if config.auth_code:
        conn.auth.login()
        ui.info(f"exchanged --auth-code: logged in, token saved in {conn.auth.store.path}")


def plan_library(config: Config, conn: Connection, ui: Ui) -> Plan:
    """--dry-run: select and count; download nothing."""
    exchange_auth_code(config, conn, ui)
    library = Library(config.output_dir, sidecars=config.sidecars).load()  # reads only: no lock needed
    selection = select(config, conn.api, library)
    return plan(selection, config.daily_cap, conn.limits.window().downloads_used)


def download_library(config: Config, conn: Connection, ui: Ui) -> RunReport:
    """Select under the output folder's lock, then download what is new."""
    library = Library(config.output_dir, sidecars=config.sidecars)
    with library.locked(config.wait_lock, ui):
        library.check_variant(config.previews)
        selection = select(config, conn.api, library)
        for sound_id in selection.missing:
            library.note_failed(sound_id, "not found on Freesound", time.time())
        todo = selection.new[:config.max] if config.max is not None else selection.new
        report = RunReport(skipped=selection.present, missing=selection.missing, changed=selection.changed,
                           remaining=len(selection.new) - len(todo))
        if todo:
            if not config.previews:  # log in now, before the first download is paced
                conn.auth.access_token()
            downloader = Downloader(config, conn, library, ui, report)
            if (pack := whole_pack(config, selection, len(todo), conn.limits.window())) is not None:
                todo = downloader.download_pack(pack, todo)
            if todo:
                downloader.run(todo)
        report.window = conn.limits.window()
    return report


def exclude_from_library(config: Config, ui: Ui) -> ExitCode:
    """--exclude: out of the library for good (no request is sent)."""
    library = Library(config.output_dir, sidecars=config.sidecars)
    with library.locked(config.wait_lock, ui):
        removed = library.exclude(config.exclude, time.time())
    ui.info(f"excluded {len(config.exclude)} sound{'s' if len(config.exclude) != 1 else ''} "
            f"(listed in {library.excluded_path}); removed {len(removed)} file{'s' if len(removed) != 1 else ''}"
            + (": " + ", ".join(removed) if removed else ""))
    return ExitCode.SUCCESS


def plan_collections(config: Config, conn: Connection, ui: Ui) -> LibraryPlan:
    """--dry-run of a --library file: every collection planned, in one daily window."""
    exchange_auth_code(config, conn, ui)  # once, not per collection: a code works once
    plans = {c.name: plan_library(dataclasses.replace(c.config, auth_code=None), conn, ui)
             for c in config.collections}
    used = conn.limits.window().downloads_used
    return LibraryPlan(plans, config.daily_cap, used,
                       runs_needed(sum(p.new for p in plans.values()), config.daily_cap, used))


def download_collections(config: Config, conn: Connection, ui: Ui) -> LibraryReport:
    """A --library file's collections in file order, under one lock and one daily window;
    a daily limit stops the run, leaving the later collections for the next one."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(config.output_dir / ".freesound-library.lock")
    if not lock.acquire(wait=config.wait_lock):
        raise UsageError(f"another run is working through a library in {config.output_dir}; "
                         "let it finish, or pass --wait-lock to wait for it")
    report = LibraryReport()
    try:
        for collection in config.collections:
            if report.exit_code == ExitCode.DAILY_LIMIT:
                report.not_started.append(collection.name)
                continue
            ui.info(f"collection {collection.name}: into {collection.config.output_dir}")
            report.reports[collection.name] = download_library(collection.config, conn, ui)
    finally:
        lock.release()
    return report


def audit_library(config: Config, conn: Connection, ui: Ui) -> AuditReport:
    """--audit: every recorded sound against Freesound's metadata today (one search per 150
    sounds) and its file against its record; findings noted in metadata.json; with
    --repair, missing or damaged files downloaded again (not a replaced original, unless
    --accept-changed)."""
    library = Library(config.output_dir, sidecars=config.sidecars)
    report, updates, to_repair = AuditReport(), {}, []
    with library.locked(config.wait_lock, ui):
        for batch in batched((entry for entry, _ in iter_metadata(library.metadata_path)), PAGE_SIZE):
            found, _ = conn.api.sounds_by_id([int(e["id"]) for e in batch], look_up_missing=False)  # 1 request
            today = {int(sound["id"]): sound for sound in found}
            for entry in batch:
                sound_id, local = int(entry["id"]), local_state(library.folder, entry)
                findings, current = audit_sound(entry, today.get(sound_id), local)
                report.findings += findings
                updates[sound_id] = {"audited_at": iso_utc(time.time()), "current": current}
                replaced = any(finding.kind == "replaced" for finding in findings)
                if local and sound_id in today and (config.accept_changed or not replaced):
                    to_repair.append(today[sound_id])
            report.audited += len(batch)
            ui.info(f"audited {report.audited} sounds")
        library.annotate(updates)
        if config.repair and to_repair:
            library.check_variant(config.previews)
            conn.auth.access_token()
            Downloader(config, conn, library, ui, RunReport()).run(to_repair)
            # A repaired sound has a new entry in the journal, and its file checks out against it.
            report.repaired = [int(sound["id"]) for sound in to_repair
                               if local_state(library.folder, library.pending.get(int(sound["id"]), sound)) is None]
    return report


def local_state(folder: Path, entry: dict) -> str | None:
    """None if the entry's file is on disk with its recorded size and md5, else "missing"
    or "damaged"."""
    path = folder / Path(str(entry.get("file") or "")).name
    if not entry.get("file") or not path.is_file():
        return "missing"
    if entry.get("filesize") is not None and path.stat().st_size != entry["filesize"]:
        return "damaged"
    if entry.get("md5") and hash_file(path).hexdigest() != str(entry["md5"]).lower():
        return "damaged"
    return None


class Downloader:
    """Downloads a list of sounds with --jobs workers under one pacer, ledger and metadata
    writer, counting every outcome in the report."""

    def __init__(self, config: Config, conn: Connection, library: Library, ui: Ui, report: RunReport) -> None:
        self.config, self.api, self.library, self.ui, self.report = config, conn.api, library, ui, report
        self.stop = conn.stop             # no new request: a daily limit, a fatal error, Ctrl-C
        self.abort = threading.Event()    # Ctrl-C: transfers in flight stop too, keeping their .part
        self._lock = threading.Lock()     # guards the report and the shared queue
        self._fatal: BaseException | None = None

    def run(self, todo: list[dict]) -> None:
        """Download `todo`; with --wait, sleep through each full daily window and carry on."""
        left_out_by_max = self.report.remaining
        while True:
            self.report.remaining = left_out_by_max
            self._download_all(todo)
            stopped = self.report.stopped
            if not (self.config.wait and stopped is not None and stopped.frees_at is not None):
                return
            todo = [s for s in todo if not self.library.has(int(s["id"])) and int(s["id"]) not in self.report.failed]
            if todo:
                wait = max(0.0, stopped.frees_at.timestamp() - time.time()) + 1.0
                self.ui.info(f"{stopped}; --wait: sleeping until {format_utc(time.time() + wait)}, "
                             f"then {len(todo)} more")
                time.sleep(wait)
            self.report.stopped = None
            self.stop.clear()
            if not todo:
                self.report.remaining = left_out_by_max
                return

    def _download_all(self, todo: list[dict]) -> None:
        queue, done = iter(todo), [0]

        def work(slot: int) -> None:
            while not self.stop.is_set():
                with self._lock:
                    sound = next(queue, None)
                if sound is None:
                    return
                if self._download_counted(sound, slot):
                    with self._lock:
                        done[0] += 1

        self.ui.start(len(todo))
        try:
            jobs = min(self.config.jobs, len(todo))
            if jobs == 1:
                self._guarded(work, 0)  # in the main thread: Ctrl-C interrupts the download at once
            else:
                self._run_workers(work, jobs)
        finally:
            self.ui.finish()
            if self.report.stopped is not None:
                self.report.remaining += len(todo) - done[0]
        if self._fatal is not None:
            raise self._fatal

    def _guarded(self, work: Callable[[int], None], slot: int) -> None:
        try:
            work(slot)
        except Stopped:
            pass
        except BaseException as exc:  # re-raised by the main thread, once all have stopped
            self._fatal = self._fatal or exc
            self.stop.set()

    def _run_workers(self, work: Callable[[int], None], jobs: int) -> None:
        threads = [threading.Thread(target=self._guarded, args=(work, slot), daemon=True) for slot in range(jobs)]
        for thread in threads:
            thread.start()
        try:
            while alive := [thread for thread in threads if thread.is_alive()]:
                alive[0].join(0.1)  # a short join, so that Ctrl-C reaches this thread
        except (KeyboardInterrupt, Terminated):
            self.stop.set()
            self.abort.set()  # each download stops at its next chunk and keeps its .part
            self.ui.info("stopping: letting the downloads in flight save their partial files")
            for thread in threads:
                thread.join()
            raise

    def _download_counted(self, sound: dict, slot: int) -> bool:
        """Download one sound and count the outcome; False if a daily limit stopped it."""
        try:
            self._download_one(sound, slot)
        except DailyLimitReached as exc:
            with self._lock:
                self.report.stopped = self.report.stopped or exc
            self.stop.set()
            return False
        except DownloadError as exc:
            with self._lock:
                self.report.failed[exc.sound_id] = exc.reason
            self.library.note_failed(exc.sound_id, exc.reason, time.time())
            self.ui.warn(str(exc))
        self.ui.advance()
        return True

    def _download_one(self, sound: dict, slot: int) -> None:
        preview = self.config.previews
        name = sound_filename(sound, preview)
        dest = self.library.folder / name
        if not preview and self.library.adoptable(sound, dest):
            self.library.record(sound, name, time.time())
            with self._lock:
                self.report.skipped += 1
            return
        part, md5_hex = self._retrying(
            lambda: download_to(self.api, sound, dest, self.ui.slot(slot), self.abort, preview),
            int(sound["id"]), f"sound {sound['id']}")
        if preview:
            sound = {**sound, "filesize": part.stat().st_size, "md5": md5_hex,
                     "type": preview.partition("-")[2], "preview": preview}
        self._keep(sound, part, name)

    def _keep(self, sound: dict, part: Path, name: str, how: str = "") -> None:
        """Move a verified .part into place and record it, as one step for Ctrl-C."""
        with signals_deferred():
            os.replace(part, self.library.folder / name)
            self.library.record(sound, name, time.time())
        with self._lock:
            self.report.downloaded += 1
        self.ui.info(f"downloaded {name} ({format_size(int(sound.get('filesize') or 0))}{how})")

    def _retrying(self, fetch: Callable[[], tuple[Path, str]], item_id: int, what: str) -> tuple[Path, str]:
        """Resume after a dropped connection; after a corrupt file, start over once."""
        for attempt in range(1, self.config.retries + 2):
            try:
                return fetch()
            except NetworkError as exc:
                reason = exc.detail
            except CorruptDownload as exc:
                if attempt >= 2:
                    raise
                reason = exc.reason
            if attempt > self.config.retries:
                raise DownloadError(item_id, f"{reason}; gave up after {attempt} tries")
            self.ui.info(f"{what}: {reason}; trying again")
        raise AssertionError("unreachable: the last attempt returns or raises")

    def download_pack(self, pack_id: int, todo: list[dict]) -> list[dict]:
        """Fetch a whole pack as one zip (one request; each sound counts as a download),
        keep every sound that checks out, delete the zip. Returns the sounds still to
        fetch one by one: those that failed, or all of them if the zip did."""
        counted = [int(sound["id"]) for sound in todo]

        def open_at(offset: int) -> requests.Response:
            members = counted.copy()
            counted.clear()  # the sounds count once, however often the zip is resumed
            return self.api.open_pack(pack_id, offset, members)

        zip_dest = self.library.folder / f".pack-{pack_id}.zip"
        self.ui.info(f"pack {pack_id}: all {len(todo)} sounds in one zip")
        try:
            archive, _ = self._retrying(lambda: stream_to_part(open_at, self.api.session, zip_dest, 0, pack_id,
                                                               self.ui.slot(0), self.abort, hashed=False),
                                        pack_id, f"pack {pack_id}")
            verified, failed = unpack_pack(archive, pack_id, todo, self.library.folder, self.ui.slot(0),
                                           self.config.jobs)
        except DailyLimitReached as exc:
            self.report.stopped = exc
            self.stop.set()
            return todo
        except DownloadError as exc:
            zip_dest.with_name(zip_dest.name + PART_SUFFIX).unlink(missing_ok=True)
            self.ui.warn(f"pack {pack_id}: {exc.reason}; fetching its sounds one by one")
            return todo
        for sound, part in verified:
            self._keep(sound, part, part.name[:-len(PART_SUFFIX)], ", from the pack's zip")
        archive.unlink(missing_ok=True)
        for sound_id, reason in failed.items():
            self.ui.info(f"sound {sound_id}: {reason}; fetching it alone")
        return [sound for sound in todo if int(sound["id"]) in failed]


def status_report(config: Config, ui: Ui) -> Status:
    """--status: the rolling windows, the login, the library; no request is made."""
    if not config.client_id:
        raise AuthError(f"--status needs the client id: set {ENV_CLIENT_ID}")
    ledger = Ledger(config.state_dir / "ledger.jsonl", config.client_id, ui.warn)
    token = TokenStore(config.state_dir / "token.json", config.client_id).load(ui.warn)
    held, _, _ = read_library(config.output_dir)
    present = sum(1 for file, _, _ in held.values() if file and (config.output_dir / Path(file).name).is_file())
    return Status(client_id=config.client_id, window=Limits(config, ledger, ui, threading.Event()).window(),
                  token_expires_at=iso_utc(token["expires_at"]) if token else None,
                  token_expired=token is not None and token["expires_at"] < time.time(),
                  output_dir=str(config.output_dir), sounds_present=present, sounds_in_metadata=len(held))


###############################################################################
# Command line ################################################################
###############################################################################


class _Parser(argparse.ArgumentParser):
    raise_errors = False  # for flags that come from a --library file: the caller names the place

    def error(self, message: str) -> NoReturn:
        """One line, like every other error here (argparse would print the whole usage too)."""
        if self.raise_errors:
            raise UsageError(message)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = _Parser(
        prog=PROG, description=doc.split("\n\n")[0],
        epilog=doc[doc.index("Examples:"):] + "\nDocumentation: README.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-q", "--query", metavar="TEXT", help='text search; "" means all sounds')
    source.add_argument("--ids-file", metavar="PATH",
                        help="file with one sound ID or URL per line ('-' reads standard input)")
    source.add_argument("--ids", nargs="+", metavar="ID_OR_URL", help="sound IDs or URLs")
    source.add_argument("--pack", type=int, metavar="ID", help="a pack's sounds")
    source.add_argument("--user", metavar="NAME", help="a user's sounds")
    source.add_argument("--bookmarks", nargs="?", const="", metavar="CATEGORY",
                        help="your bookmarks in this category (id or name); without one, list the categories")
    source.add_argument("--similar-to", metavar="ID_OR_URL",
                        help="sounds that sound like this one (closest first; --filter and the helpers apply)")
    source.add_argument("--library", metavar="FILE.toml",
                        help="the named collections of a library file, in order, each in <output>/<name>/")
    _add_selection_flags(parser)
    _add_pacing_flags(parser)
    _add_login_flags(parser)
    add = parser.add_argument
    add("-o", "--output-dir", default="sounds", metavar="DIR", help="output folder (default: ./sounds)")
    add("--accept-changed", action="store_true",
        help="with a metadata.json as --ids-file: download a sound even if Freesound now serves another original")
    add("--audit", action="store_true",
        help="check every sound in the library against Freesound (150 per request, API key only) and its "
             "file against its record; exit 1 with findings")
    add("--repair", action="store_true", help="with --audit: download missing or damaged files again")
    add("--exclude", nargs="+", metavar="ID_OR_URL",
        help="remove these sounds from the library (files and metadata) and list them in excluded_ids.txt, "
             "so that no source selects them again; downloads nothing")
    add("--wait-lock", action="store_true",
        help="if another run is using the output folder, wait for it instead of exiting")
    add("--dry-run", action="store_true", help="show what would be downloaded; download nothing")
    add("--status", action="store_true",
        help="show the rolling windows, the login and the library; download nothing, send nothing")
    add("--previews", nargs="?", const="hq-mp3", choices=PREVIEW_KINDS, metavar="KIND",
        help="download previews (" + ", ".join(PREVIEW_KINDS) + "; default hq-mp3) instead of "
             "originals: needs only the API key, no login")
    add("--sidecars", action="store_true",
        help="also write <file>.json beside each audio file: its metadata and attribution line")
    add("--json", action="store_true",
        help="print one JSON summary object on stdout at the end (progress stays on stderr)")
    add("--quiet", action="store_true", help="show only errors")
    add("--debug", action="store_true", help="show tracebacks")
    add("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _add_selection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filter", metavar="SOLR", help="Solr filter, passed to the API as is")
    helpers = parser.add_argument_group("filter helpers (compiled to Solr syntax and ANDed with --filter)")
    helpers.add_argument("--license", action="append", default=[], choices=list(LICENSE_FILTER_NAMES),
                         help="repeatable; any of them")
    helpers.add_argument("--min-duration", type=float, metavar="SECONDS")
    helpers.add_argument("--max-duration", type=float, metavar="SECONDS")
    helpers.add_argument("--type", action="append", default=[], choices=AUDIO_TYPES, help="repeatable; any of them")
    helpers.add_argument("--samplerate", type=int, metavar="HZ")
    helpers.add_argument("--bitdepth", type=int, metavar="BITS")
    helpers.add_argument("--channels", type=int, metavar="N")
    helpers.add_argument("--tag", action="append", default=[], metavar="TAG", help="repeatable; all of them")
    _add_search_today_flags(helpers)
    helpers.add_argument("--print-filter", action="store_true", help="print the compiled filter and exit")
    parser.add_argument("--similarity-space", choices=SIMILARITY_SPACES,
                        help="with --similar-to: " + " or ".join(SIMILARITY_SPACES) + " (default: the first)")
    parser.add_argument("--sort", metavar="KEY",
                        help="one of: " + ", ".join(SORT_KEYS) + "; or DESCRIPTOR:TARGET[,DESCRIPTOR:TARGET...], "
                             "closest first, e.g. bpm:120,brightness:80")
    parser.add_argument("--max", type=int, metavar="N", help="download at most N new sounds this run")


def _add_search_today_flags(helpers: argparse._ArgumentGroup) -> None:
    add = helpers.add_argument
    add("--bpm", metavar="MIN-MAX", help="tempo: 118-122, or open on one side (120-, -90); "
        "a single number means exactly that tempo")
    add("--loop", action="store_true", help="loopable sounds (loopable:true)")
    add("--single-event", action="store_true", help="sounds with one single event (single_event:true)")
    add("--note", metavar="NAME", help='estimated note, e.g. A4, C#3 or Bb2 (note_name:"A4"; instrument samples)')
    add("--tonality", metavar="KEY", help='estimated key, e.g. "C minor" or "F# major"')
    add("--descriptor", action="append", default=[], metavar="NAME=VALUE|MIN-MAX",
        help="repeatable; any filterable audio descriptor, e.g. brightness=70-100 or reverbness=false")
    add("--category", metavar="NAME", help="Broad Sound Taxonomy category, any case, e.g. 'sound effects'")
    add("--subcategory", metavar="NAME", help="its subcategory, e.g. animals; brings its category along "
        "('Other' needs --category)")
    add("--gen-ai-use", choices=list(GEN_AI_USES),
        help="only sounds whose uploaders allow training models of this kind (their stated wish, "
             "not a licence term: the licence still applies)")


def _add_pacing_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--rate", type=float, default=DEFAULT_RATE_PER_MIN, metavar="N",
        help=f"downloads per minute, start to start (default {DEFAULT_RATE_PER_MIN})")
    add("--daily-cap", type=int, default=DEFAULT_DAILY_CAP, metavar="N",
        help=f"downloads per rolling 24 hours (default {DEFAULT_DAILY_CAP})")
    add("--api-rate", type=float, default=DEFAULT_API_RATE_PER_MIN, metavar="N",
        help=f"all API requests per minute (default {DEFAULT_API_RATE_PER_MIN})")
    add("--api-daily-cap", type=int, default=DEFAULT_API_DAILY_CAP, metavar="N",
        help=f"all API requests per rolling 24 hours (default {DEFAULT_API_DAILY_CAP})")
    add("-j", "--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
        help=f"downloads in flight at once, all under the same --rate (default {DEFAULT_JOBS})")
    add("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
        help=f"retries after network errors and 5xx answers (default {DEFAULT_RETRIES})")
    add("--backoff", type=float, default=DEFAULT_BACKOFF_S, metavar="SECONDS",
        help=f"first retry delay, doubled each time (default {DEFAULT_BACKOFF_S})")
    add("--timeout", type=float, default=READ_TIMEOUT_S, metavar="SECONDS",
        help=f"give up on a silent connection after this long (default {READ_TIMEOUT_S:g})")
    add("--wait", action="store_true",
        help="at the daily cap, sleep until the window frees and carry on until everything is downloaded")


def _add_login_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--login", action="store_true",
        help="log in, store the token and the client id and secret it used (mode 0600), exit")
    add("--logout", action="store_true", help="remove the stored token and credentials, exit")
    add("--auth-code", metavar="CODE",
        help="exchange this authorization code instead of prompting (also with --dry-run)")
    add("--redirect-uri", metavar="URI",
        help="log in through the browser with no copy-paste: the http://127.0.0.1/... callback you "
             "registered for your API credentials (any port works)")
    add("--client-id", help=f"OAuth2 client id (default: ${ENV_CLIENT_ID})")
    add("--client-secret", help=f"client secret / API key (default: ${ENV_CLIENT_SECRET}); "
        "visible to other users of the machine, prefer the variable or --client-secret-file")
    add("--client-secret-file", metavar="PATH", help="read the client secret from this file")
    add("--state-dir", metavar="DIR", help=f"token and ledger folder (default: ${ENV_STATE_DIR} or "
        "the per-user config folder)")


def _positive(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise UsageError(f"{name} must be a positive number, got {value}")


def read_ids(args: argparse.Namespace, stdin) -> tuple[tuple[int, ...] | None, dict[int, Pin]]:
    """--ids or --ids-file: the sounds, and their pins when the file is a metadata.json."""
    if args.ids is not None:
        return tuple(parse_id_lines(args.ids, "--ids")), {}
    if args.ids_file is None:
        return None, {}
    source = "standard input" if args.ids_file == "-" else args.ids_file
    try:
        if args.ids_file == "-":
            text = stdin.read()
            lines: Iterable[str] = text.splitlines()
            entries = (json.loads(text) if text.lstrip().startswith("[") else None)
        else:
            path = Path(args.ids_file)
            with path.open(encoding="utf-8") as handle:
                is_json = handle.read(64).lstrip().startswith("[")
            entries = (entry for entry, _ in iter_metadata(path)) if is_json else None
            lines = path.read_text(encoding="utf-8").splitlines() if not is_json else []
        if entries is None:
            return tuple(parse_id_lines(lines, source)), {}
        ids, pins = metadata_ids(entries, source)
        return tuple(ids), pins
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --ids-file {args.ids_file}: {exc}") from None
    except (ValueError, AttributeError, TypeError) as exc:  # JSON that is not a metadata.json
        raise UsageError(f"--ids-file {source} is not valid metadata: a JSON array of objects with an 'id' "
                         f"({exc})") from None


def read_secret(args: argparse.Namespace, environ: dict) -> str | None:
    if args.client_secret_file:
        try:
            with open(args.client_secret_file, encoding="utf-8") as handle:
                return handle.readline().strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --client-secret-file {args.client_secret_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    return args.client_secret or environ.get(ENV_CLIENT_SECRET)


def check_api_base(url: str) -> str:
    """https only, except on loopback hosts (tests and local trials)."""
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{ENV_API_URL} must be an http(s) URL, got {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise UsageError(f"refusing plain http for {parts.hostname}: the API URL must be https "
                         "(http is only allowed for loopback test servers)")
    return url


def filter_from_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The compiled filter, and the notes to show about it (old descriptor names)."""
    if args.filter is not None and not args.filter.strip():
        raise UsageError("--filter is empty (Freesound answers 'Invalid filter'); leave it out instead")
    for name in ("min_duration", "max_duration", "samplerate", "bitdepth", "channels"):
        value = getattr(args, name)
        if value is not None and (value < 0 or not math.isfinite(value)):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if None not in (args.min_duration, args.max_duration) and args.min_duration > args.max_duration:
        raise UsageError(f"--min-duration {args.min_duration:g} is above --max-duration {args.max_duration:g}")
    if any(not tag.strip() for tag in args.tag):
        raise UsageError("--tag cannot be empty")
    user_filter, notes = modernize_filter(args.filter) if args.filter is not None else (None, [])
    clauses = filter_clauses(licenses=args.license, min_duration=args.min_duration,
                             max_duration=args.max_duration, types=args.type, samplerate=args.samplerate,
                             bitdepth=args.bitdepth, channels=args.channels, tags=args.tag)
    return build_filter(user_filter, clauses + search_today_clauses(args, notes)), notes


def search_today_clauses(args: argparse.Namespace, notes: list[str]) -> list[str]:
    """The descriptor, taxonomy and AI-preference helpers as clauses; notes are added to."""
    named = (("--bpm", "bpm", args.bpm), ("--note", "note_name", args.note),
             ("--tonality", "tonality", args.tonality))
    clauses = [descriptor_clause(DESCRIPTORS[name], value, flag) for flag, name, value in named if value is not None]
    clauses += [clause for flag, clause in (("loop", "loopable:true"), ("single_event", "single_event:true"))
                if getattr(args, flag)]
    for spec in args.descriptor:
        clause, more_notes = descriptor_option(spec)
        clauses.append(clause)
        notes += [note for note in more_notes if note not in notes]
    clauses += taxonomy_clauses(args.category, args.subcategory)
    return clauses + ([gen_ai_clause(args.gen_ai_use)] if args.gen_ai_use else [])


SEARCH_SOURCES = ("query", "similar_to")  # where --filter and the helpers apply


def given_sources(args: argparse.Namespace) -> list[str]:
    return [name for name in (*SEARCH_SOURCES, "ids", "ids_file", "pack", "user", "bookmarks", "library")
            if getattr(args, name) is not None]


def action_from_args(args: argparse.Namespace) -> Action:
    """The action the flags ask for (in Action's order), checked against the source."""
    sources = given_sources(args)
    if args.login and sources:
        raise UsageError("--login takes no source; it only logs in")
    if args.logout and (sources or args.login):
        raise UsageError("--logout takes no source and no --login; it only forgets the stored login")
    if args.exclude and (sources or args.login or args.logout):
        raise UsageError("--exclude is an action of its own: it takes no source and downloads nothing")
    if args.audit and (sources or args.exclude):
        raise UsageError("--audit checks the library in --output-dir: it takes no source")
    if args.repair and not args.audit:
        raise UsageError("--repair goes with --audit")
    if args.print_filter:
        return Action.PRINT_FILTER
    if args.login:
        return Action.LOGIN
    if args.logout:
        return Action.LOGOUT
    if args.exclude:
        return Action.EXCLUDE
    if args.audit:
        return Action.AUDIT
    if args.bookmarks == "":
        return Action.LIST_BOOKMARKS
    if args.status:
        return Action.STATUS
    if not sources:
        raise UsageError("give exactly one source: --query TEXT, --ids-file PATH, --ids ID ..., "
                         "--pack ID, --user NAME, --bookmarks [CATEGORY], --similar-to ID or --library FILE")
    return Action.DRY_RUN if args.dry_run else Action.DOWNLOAD


def check_numbers(args: argparse.Namespace) -> None:
    for name, value in (("--rate", args.rate), ("--api-rate", args.api_rate),
                        ("--daily-cap", args.daily_cap), ("--api-daily-cap", args.api_daily_cap)):
        _positive(name, value)
    _positive("--max", args.max, allow_none=True)
    if args.retries < 0 or args.backoff < 0:
        raise UsageError("--retries and --backoff cannot be negative")
    _positive("--timeout", args.timeout)
    if not 1 <= args.jobs <= MAX_JOBS:
        raise UsageError(f"--jobs must be between 1 and {MAX_JOBS}, got {args.jobs}")


def config_from_args(args: argparse.Namespace, environ: dict, stdin=sys.stdin) -> Config:
    """Validate the parsed flags and environment into a Config; raise UsageError on bad input."""
    action = action_from_args(args)
    selection = selection_fields(args, stdin)
    check_numbers(args)
    state_dir_text = args.state_dir or environ.get(ENV_STATE_DIR)
    state_dir = Path(state_dir_text) if state_dir_text else default_state_dir(sys.platform, environ, Path.home())
    # Flags and the environment win; else what --login stored. --login itself stores what it used.
    stored = {} if action in (Action.LOGIN, Action.LOGOUT) else load_credentials(state_dir)
    config = Config(
        action=action, **selection, accept_changed=args.accept_changed,
        exclude=tuple(parse_id_lines(args.exclude, "--exclude")) if args.exclude else (), repair=args.repair,
        output_dir=Path(args.output_dir), rate=args.rate, daily_cap=args.daily_cap,
        api_rate=args.api_rate, api_daily_cap=args.api_daily_cap, wait=args.wait, json=args.json,
        sidecars=args.sidecars, previews=args.previews, auth_code=args.auth_code,
        redirect_uri=check_redirect_uri(args.redirect_uri) if args.redirect_uri else None,
        client_id=args.client_id or environ.get(ENV_CLIENT_ID) or stored.get("client_id"),
        client_secret=read_secret(args, environ) or stored.get("client_secret"),
        api_base=check_api_base(environ.get(ENV_API_URL) or DEFAULT_API_BASE),
        state_dir=state_dir,
        jobs=args.jobs, retries=args.retries, backoff=args.backoff, timeout=args.timeout,
        wait_lock=args.wait_lock)
    if args.library is None:
        return config
    return dataclasses.replace(config, collections=tuple(read_collections(Path(args.library), config, stdin)))


def selection_fields(args: argparse.Namespace, stdin) -> dict[str, Any]:
    """The Config fields that say which sounds: the source, its filter and sort, --max."""
    compiled, notes = filter_from_args(args)
    if compiled is not None and set(given_sources(args)) - set(SEARCH_SOURCES):
        raise UsageError("--filter and the filter helpers apply to --query and --similar-to only "
                         '(use --query "" --filter ... to filter all sounds)')
    sort, sort_notes = sort_option(args.sort) if args.sort is not None else (None, [])
    if args.similarity_space and args.similar_to is None:
        raise UsageError("--similarity-space goes with --similar-to")
    ids, pins = read_ids(args, stdin)
    return dict(query=args.query, ids=ids, pins=pins, pack=args.pack, user=args.user,
                bookmark_category=args.bookmarks or None, similar_to=similar_to_id(args.similar_to),
                similarity_space=args.similarity_space, filter=compiled, sort=sort, max=args.max,
                notes=tuple(dict.fromkeys(notes + sort_notes)))


COLLECTION_SOURCES = ("query", "ids_file", "pack", "user", "similar_to")
COLLECTION_KEYS = frozenset({
    "name", "output_dir", "max", "sort", "filter", *COLLECTION_SOURCES, "license", "min_duration", "max_duration",
    "type", "samplerate", "bitdepth", "channels", "tag", "bpm", "loop", "single_event", "note", "tonality",
    "descriptor", "category", "subcategory", "gen_ai_use", "similarity_space"})


@dataclasses.dataclass(frozen=True)
class Collection:
    """One [[collection]] of a --library file: its name and the Config its run uses."""

    name: str
    config: Config


def read_collections(path: Path, base: Config, stdin) -> list[Collection]:
    """A --library file's collections, each checked as its flags would be; a mistake is exit 2
    naming the file, the collection and the key."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read --library {path}: {exc}") from None
    tables = data.get("collection")
    if set(data) - {"collection"} or not isinstance(tables, list) or not tables:
        raise UsageError(f"{path}: expected [[collection]] tables and nothing else")
    collections: list[Collection] = []
    for number, table in enumerate(tables, start=1):
        name = table.get("name")
        where = f"{path}, collection {name!r}" if isinstance(name, str) else f"{path}, collection {number}"
        if not isinstance(name, str) or not re.fullmatch(r"[\w][\w .-]*", name):
            raise UsageError(f"{where}: needs a name (letters, digits, spaces, '.', '-', '_')")
        if name in (c.name for c in collections):
            raise UsageError(f"{where}: a second collection with this name")
        try:
            config = collection_config(table, path.parent, base, stdin)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        collections.append(Collection(name, config))
    return collections


def collection_config(table: dict, folder: Path, base: Config, stdin) -> Config:
    """One collection's Config: its keys read as the flags of the same names (so every check
    and helper applies), paths relative to the library file's folder."""
    unknown = sorted(set(table) - COLLECTION_KEYS)
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r}")
    sources = [key for key in COLLECTION_SOURCES if key in table]
    if len(sources) != 1:
        raise UsageError(f"needs exactly one source key ({', '.join(COLLECTION_SOURCES)}), has "
                         + (", ".join(sources) if sources else "none"))
    argv: list[str] = []
    for key, value in table.items():
        if key in ("name", "output_dir"):
            continue
        if key == "ids_file":
            value = str(folder / str(value))
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [f"{flag}={item}" for item in (value if isinstance(value, list) else [value])]
    parser = build_parser()
    parser.raise_errors = True  # type: ignore[attr-defined]  # build_parser makes a _Parser
    args = parser.parse_args(argv)
    _positive("max", args.max, allow_none=True)
    fields = selection_fields(args, stdin)
    output = folder / str(table["output_dir"]) if "output_dir" in table else base.output_dir / str(table["name"])
    return dataclasses.replace(base, **{**fields, "max": fields["max"] or base.max,
                                        "sort": fields["sort"] or base.sort}, output_dir=output)


def similar_to_id(text: str | None) -> int | None:
    if text is None:
        return None
    sound_id = parse_sound_ref(text)
    if sound_id is None:
        raise UsageError(f"--similar-to: not a Freesound sound ID or URL: {text!r}")
    return sound_id


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def program(config: Config, ui: Ui, stdin) -> ExitCode:
    """The work, without error handling: one branch per action."""
    def read_line() -> str:
        line = stdin.readline()
        if not stdin.isatty():
            ui.prompt("\n")  # a piped answer is not echoed: end the prompt line ourselves
        return line

    for note in dict.fromkeys([*config.notes, *(note for c in config.collections for note in c.config.notes)]):
        ui.info(note)
    if config.rate > config.api_rate:
        ui.info(f"note: --rate {config.rate:g} is above --api-rate {config.api_rate:g}; "
                f"downloads will start at most {config.api_rate:g} a minute")
    if config.action is Action.PRINT_FILTER:
        print(config.filter or "")
        return ExitCode.SUCCESS
    if config.action is Action.STATUS:
        return show(status_report(config, ui), config)
    if config.action is Action.EXCLUDE:
        return exclude_from_library(config, ui)
    if config.action is Action.LOGOUT:
        removed = log_out(config.state_dir)
        ui.info("removed " + ", ".join(map(str, removed)) if removed else f"nothing stored in {config.state_dir}")
        return ExitCode.SUCCESS
    conn = connect(config, ui, read_line)
    if config.action is Action.LOGIN:
        return log_in(config, conn, ui)
    if config.action is Action.LIST_BOOKMARKS:
        print(bookmark_categories_text(conn.api))
        return ExitCode.SUCCESS
    if config.action is Action.DRY_RUN:
        return show(plan_collections(config, conn, ui) if config.collections else plan_library(config, conn, ui),
                    config)
    if config.action is Action.AUDIT:
        return show(audit_library(config, conn, ui), config)
    report = download_collections(config, conn, ui) if config.collections else download_library(config, conn, ui)
    (ui.info if report.exit_code == ExitCode.SUCCESS else ui.warn)(report.text())
    if config.json:
        print(json.dumps(as_json(report), sort_keys=True))
    return report.exit_code


def log_in(config: Config, conn: Connection, ui: Ui) -> ExitCode:
    conn.auth.login()
    saved = save_credentials(config.state_dir, config.client_id or "", config.client_secret or "")
    ui.info(f"logged in; token saved in {conn.auth.store.path}, client id and secret in {saved}: "
            "later runs (cron, systemd) need no credentials in their environment")
    return ExitCode.SUCCESS


def show(report: Plan | LibraryPlan | Status | AuditReport, config: Config) -> ExitCode:
    """Print a report on stdout, as text or as JSON with --json; its exit code (0 for a plan
    or a status, 1 for an audit with findings)."""
    print(json.dumps(as_json(report), sort_keys=True) if config.json else report.text())
    return report.exit_code if isinstance(report, AuditReport) else ExitCode.SUCCESS


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, and map every error to its exit code: the only place that does."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's own usage errors already printed their line
        return ExitCode.USAGE if exc.code else ExitCode.SUCCESS
    ui = Ui(sys.stderr, quiet=args.quiet)
    if args.client_secret:
        ui.warn(f"--client-secret is visible to other users of this machine (ps); prefer ${ENV_CLIENT_SECRET}")
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # main thread only, like Ctrl-C
    try:
        config = config_from_args(args, dict(os.environ), sys.stdin)
        return program(config, ui, sys.stdin)
    except FreesoundDownloadError as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        if args.json:  # scripts get an object whatever happened
            print(json.dumps({"error": str(exc), "exit_code": int(exc.exit_code)}))
        return exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:
        code = ExitCode.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else ExitCode.TERMINATED
        what = "interrupted" if code == ExitCode.INTERRUPTED else "terminated"
        print(f"\n{PROG}: {what}; finished files and metadata are saved, re-run to resume", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": what, "exit_code": int(code)}))
        return code
    except OSError as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return ExitCode.SOME_FAILED
    except Exception as exc:  # a bug: say so in one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {exc} (re-run with --debug for details)",
              file=sys.stderr)
        return ExitCode.SOME_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
