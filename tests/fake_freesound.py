#!/usr/bin/env python3
"""A fake Freesound API v2 server on loopback, faithful to the real server's behaviour.

The facts it follows (README, "How the real API behaves") were read from the source of
Freesound's server and of the libraries it runs: Django REST framework 3.15 and
django-oauth-toolkit 3.0.1.

Tests start it in-process (`FakeFreesound().start()`); a newcomer can run it by hand:

    python tests/fake_freesound.py --port 8765

and point the downloader at it with FREESOUND_API_URL=http://127.0.0.1:8765/apiv2.

What it reproduces: the OAuth2 authorize/token endpoints (10-minute single-use codes,
optional PKCE, rotating refresh tokens, invalid_grant / invalid_client), search with the
real `next` links and page rules, the `id:(...)` filter and a useful subset of Solr
filter syntax as the server rewrites it (type suffixes only on words that start with a
descriptor's name: `(bpm:1 OR bpm:2)` is an undefined field, and so are the old `ac_`
names), today's descriptors, taxonomy and AI preferences, `similar_to` with cosine
similarity over `FakeSound.vectors`, sorting by closeness to descriptor targets, sound
instances, original downloads and pack zips (Bearer only, Content-Disposition, Range),
per-credential rolling throttles with the real 429 bodies and no Retry-After, and the
real 401/404 bodies. A refresh revokes the old access token at once, and
`fake.access_lifetime_s` makes tokens short-lived. Fault injection: `fake.inject(...)`
queues one-shot responses for matching requests, `fake.drop_after` and
`fake.pack_drop_after` cut download and zip bodies short, `fake.corrupt_members` zeroes
sounds inside pack zips. Every request is logged in `fake.requests` with its arrival time, and once
answered, its status and `answered_at`: tests use that log as their clock.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import secrets
import string
import threading
import time
from base64 import b64decode, urlsafe_b64encode
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NoReturn
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

CLIENT_ID = "fakeclientid00000000"
CLIENT_SECRET = "fake-secret-" + "0" * 28
CODE_LIFETIME_S = 600
ACCESS_LIFETIME_S = 86400
SEARCH_PATHS = ("/apiv2/search/", "/apiv2/search/text/")
LICENSES = {
    "Creative Commons 0": "http://creativecommons.org/publicdomain/zero/1.0/",
    "Attribution": "https://creativecommons.org/licenses/by/4.0/",
    "Attribution NonCommercial": "https://creativecommons.org/licenses/by-nc/4.0/",
    "Sampling+": "http://creativecommons.org/licenses/sampling+/1.0/",
}
NOT_AUTHENTICATED = "Authentication credentials were not provided."
QUOTE_SAFE = ",:[]*+()'"


def generate_token(length: int = 30) -> str:
    """oauthlib's generate_token: ASCII letters and digits, as Freesound's codes and tokens."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(length))


def slugify(text: str) -> str:
    import unicodedata
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text.lower())
    return re.sub(r"[-\s]+", "-", text).strip("-_")


@dataclass
class FakeSound:
    id: int
    name: str
    username: str
    license: str = "Creative Commons 0"  # the licence *name*, as filters match it
    type: str = "wav"
    tags: list = field(default_factory=list)
    description: str = ""
    duration: float = 1.0
    samplerate: float = 44100.0
    bitdepth: int | None = 16
    channels: int = 2
    pack_name: str | None = None
    data: bytes = b""
    moderated: bool = True  # unmoderated sounds have metadata but answer 404 to downloads
    path: str | None = None  # serve this file instead of `data` (big originals for benchmarks)
    pack_id: int | None = None
    category: str | None = None
    subcategory: str | None = None
    gen_ai_preference: str = "no-additional-preferences"
    descriptors: dict = field(default_factory=dict)  # today's names: {"bpm": 120.0, "loopable": True}
    vectors: dict = field(default_factory=dict)      # similarity space -> embedding
    _md5: str | None = None

    def descriptor(self, name: str):
        if name in ("category", "subcategory"):
            return getattr(self, name)
        return self.descriptors.get(name)

    @property
    def size(self) -> int:
        return os.path.getsize(self.path) if self.path else len(self.data)

    @property
    def md5(self) -> str:
        if self._md5 is None:
            digest = hashlib.md5()
            if self.path:
                with open(self.path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            else:
                digest.update(self.data)
            self._md5 = digest.hexdigest()
        return self._md5

    def as_json(self, base: str, fields: list[str] | None) -> dict:
        full = {
            "id": self.id, "url": f"https://freesound.org/people/{self.username}/sounds/{self.id}/",
            "name": self.name, "tags": self.tags, "description": self.description,
            "created": "2020-01-02T03:04:05Z", "license": LICENSES.get(self.license, self.license),
            "type": self.type, "channels": self.channels, "filesize": self.size,
            "bitrate": 0, "bitdepth": self.bitdepth, "duration": self.duration,
            "samplerate": self.samplerate, "username": self.username, "pack": None,
            "pack_name": self.pack_name, "download": f"{base}/sounds/{self.id}/download/",
            "previews": {f"preview-{q}-{f}": f"{base}/previews/{self.id}-{q}.{f}"
                         for q in ("hq", "lq") for f in ("mp3", "ogg")},
            "md5": self.md5, "num_downloads": 0, "category": self.category, "subcategory": self.subcategory,
            "category_is_user_provided": False, "gen_ai_preference": self.gen_ai_preference,
            **{name: self.descriptor(name) for name in DESCRIPTOR_SUFFIXES},
        }
        if fields is None:
            fields = ["id", "name", "tags", "username", "license"]
        return {key: full[key] for key in fields if key in full}  # unknown names are dropped

    def preview_bytes(self, quality: str, extension: str) -> bytes:
        return f"PREVIEW {quality} {extension} of {self.id}:".encode() + self.data[:256]

    def friendly_filename(self) -> str:
        stem = self.name.rsplit(".", 1)[0] if "." in self.name else self.name
        return f"{self.id}__{slugify(self.username)}__{slugify(stem)}.{self.type}"


def make_sounds(count: int, start_id: int = 1000, size: int = 2048, seed: int = 1) -> list[FakeSound]:
    """Deterministic small sounds with varied licences, types, tags, taxonomy, AI
    preferences and descriptors."""
    import random
    rng = random.Random(seed)
    names = list(LICENSES)
    sounds = []
    for n in range(count):
        sound_id = start_id + n
        sound_type = ("wav", "flac", "aiff")[n % 3]
        category, subcategory = TAXONOMY_SAMPLES[n % len(TAXONOMY_SAMPLES)]
        descriptors: dict[str, object] = {
            "bpm": float(80 + 10 * (n % 7)), "loopable": n % 3 == 0, "single_event": n % 2 == 1,
            "brightness": float(n * 13 % 101), "reverbness": n % 4 == 0, "pitch": 110.0 * (1 + n % 4)}
        if category == "Instrument samples":
            descriptors.update(note_name=("A4", "C3", "F#2")[n % 3], note_midi=(69, 48, 42)[n % 3],
                               note_confidence=0.9, tonality="C minor" if n % 2 else "A major")
        sounds.append(FakeSound(
            id=sound_id, name=f"Sound number {sound_id}.{sound_type}", username=f"user{n % 5}",
            license=names[n % len(names)], type=sound_type,
            tags=["field-recording", "rain" if n % 2 else "wind"], description=f"Sound {sound_id}",
            duration=float(1 + n % 30), bitdepth=(16, 24)[n % 2], category=category, subcategory=subcategory,
            gen_ai_preference=GEN_AI_PREFERENCES[n % len(GEN_AI_PREFERENCES)], descriptors=descriptors,
            data=bytes(rng.getrandbits(8) for _ in range(size + n))))
    return sounds


TAXONOMY_SAMPLES = (("Sound effects", "Animals"), ("Soundscapes", "Nature"), ("Instrument samples", "Percussion"),
                    ("Music", "Other"), ("Sound effects", "Other mechanisms, engines, machines"))
GEN_AI_PREFERENCES = ("no-additional-preferences", "open-source-models", "noncommercial-open-source-models",
                      "no-gen-ai")


###############################################################################
# Search filters: the server's rewrite, then a small Lucene parser #############
###############################################################################

class FilterError(ValueError):
    pass


# Today's audio descriptors and the Solr dynamic-field suffix the server appends to each
# (float is the default). The AudioCommons `ac_` names are gone: Solr calls them undefined.
DESCRIPTOR_SUFFIXES = {
    **dict.fromkeys(("beat_count", "note_midi", "onset_count", "birdnet_detections_count",
                     "fsdsinet_detections_count"), "_i"),
    **dict.fromkeys(("loopable", "single_event", "reverbness", "has_audio_problems"), "_b"),
    **dict.fromkeys(("note_name", "tonality", "category", "subcategory"), "_s"),
    **dict.fromkeys(("birdnet_detected_class", "fsdsinet_detected_class"), "_ls"),
    **dict.fromkeys((
        "amplitude_peak_ratio", "beat_loudness", "boominess", "bpm", "bpm_confidence", "brightness",
        "decay_strength", "depth", "dissonance", "duration_effective", "dynamic_range", "hardness",
        "hpcp_crest", "hpcp_entropy", "inharmonicity", "log_attack_time", "loudness", "note_confidence",
        "pitch", "pitch_max", "pitch_min", "pitch_confidence", "pitch_salience", "pitch_var", "roughness",
        "sharpness", "silence_rate", "spectral_centroid", "spectral_complexity", "spectral_crest",
        "spectral_energy", "spectral_entropy", "spectral_flatness", "spectral_rolloff", "spectral_skewness",
        "spectral_spread", "start_time", "temporal_centroid", "temporal_centroid_ratio", "temporal_decrease",
        "temporal_skewness", "temporal_spread", "tonality_confidence", "warmth", "zero_crossing_rate"), "_d"),
}
NUMERIC_DESCRIPTORS = frozenset(n for n, suffix in DESCRIPTOR_SUFFIXES.items() if suffix in ("_d", "_i"))
SOLR_DESCRIPTOR_FIELDS = {name + suffix: name for name, suffix in DESCRIPTOR_SUFFIXES.items()}
PLAIN_FIELDS = {
    "id": "id", "name": "name", "tag": "tags", "description": "description", "username": "username",
    "license": "license", "type": "type", "channels": "channels", "samplerate": "samplerate",
    "bitdepth": "bitdepth", "duration": "duration", "filesize": "size", "pack": "pack_name",
    "md5": "md5", "gen_ai_preference": "gen_ai_preference",
}


def server_filter(text: str) -> str:
    """search_process_filter: the type suffix goes on every space-separated token that
    *starts* with a descriptor's name. So `(bpm:1 OR bpm:2)` keeps a bare `bpm` after the
    parenthesis, and so does `-loopable:true`: Solr then answers `undefined field`."""
    tokens = []
    for token in text.split(" "):
        name = token.partition(":")[0]
        if ":" in token and name in DESCRIPTOR_SUFFIXES:
            token = name + DESCRIPTOR_SUFFIXES[name] + token[len(name):]
        tokens.append(token)
    return " ".join(tokens)


def _field_value(sound: FakeSound, solr_field: str):
    if solr_field in SOLR_DESCRIPTOR_FIELDS:
        return sound.descriptor(SOLR_DESCRIPTOR_FIELDS[solr_field])
    if solr_field in PLAIN_FIELDS:
        return getattr(sound, PLAIN_FIELDS[solr_field])
    raise FilterError(f"undefined field {solr_field}")


def _matches(actual, kind: str, raw: str) -> bool:
    """One value against a phrase, a bare term, a range or `*`."""
    if actual is None:
        return False
    if kind == "range":
        bounds = raw[1:-1].split(" TO ")
        if len(bounds) != 2:
            raise FilterError(f"org.apache.solr.search.SyntaxError: Cannot parse '{raw}'")
        (low, high), inclusive_low, inclusive_high = bounds, raw[0] == "[", raw[-1] == "]"
        try:
            value = float(actual)
            above = low.strip() == "*" or (value >= float(low) if inclusive_low else value > float(low))
            below = high.strip() == "*" or (value <= float(high) if inclusive_high else value < float(high))
        except (TypeError, ValueError):
            raise FilterError(f"Cannot parse range '{raw}'") from None
        return above and below
    if raw == "*" and kind == "term":
        return True
    text = raw[1:-1].replace('\\"', '"') if kind == "phrase" else raw
    if isinstance(actual, list):
        return text in actual
    if isinstance(actual, bool):
        return text.lower() == str(actual).lower()
    if isinstance(actual, (int, float)):
        try:
            return float(text) == float(actual)
        except ValueError:
            return False
    return str(actual) == text


class _LuceneParser:
    """Enough of Solr's standard parser for filters: fields, phrases, ranges, groups,
    AND/OR/NOT and +/- (q.op=AND: juxtaposed clauses AND; OR binds looser)."""

    VALUE_RE = re.compile(r'(?P<phrase>"(?:[^"\\]|\\.)*")|(?P<range>[\[{][^\]}]*[\]}])|(?P<term>[^\s()"\[\]{}]+)')

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def parse(self):
        node = self._or()
        if self._peek(r"\S"):
            self._fail()
        return node

    def _fail(self) -> NoReturn:
        raise FilterError(f"org.apache.solr.search.SyntaxError: Cannot parse '{self.text}'")

    def _peek(self, pattern: str):
        return re.compile(r"\s*(?:" + pattern + ")").match(self.text, self.pos)

    def _accept(self, pattern: str):
        match = self._peek(pattern)
        if match:
            self.pos = match.end()
        return match

    def _or(self):
        nodes = [self._and()]
        while self._accept(r"(?:OR|\|\|)(?=[\s(])"):
            nodes.append(self._and())
        return ("any", nodes)

    def _and(self):
        nodes = [self._unary()]
        while self._peek(r"\S") and not self._peek(r"\)|(?:OR|\|\|)(?=[\s(])"):
            self._accept(r"(?:AND|&&)(?=[\s(])")
            nodes.append(self._unary())
        return ("all", nodes)

    def _unary(self):
        if self._accept(r"NOT(?=[\s(])|-|!"):
            return ("not", self._unary())
        self._accept(r"\+")
        if self._accept(r"\("):
            node = self._or()
            if not self._accept(r"\)"):
                self._fail()
            return node
        field = self._accept(r"([A-Za-z_][A-Za-z0-9_]*):")
        if not field:
            self._fail()
        name = field.group(1)
        _field_value(FakeSound(0, "", ""), name)  # undefined fields fail the whole search
        return ("field", name, self._values())

    def _values(self):
        if self._accept(r"\("):  # field:(a OR b), field:( a b )
            options, any_or = [], False
            while not self._accept(r"\)"):
                if self._accept(r"(?:OR|\|\|)(?=[\s(])"):
                    any_or = True
                    continue
                self._accept(r"(?:AND|&&)(?=[\s(])")
                options.append(self._value())
            return ("any" if any_or else "all", options)
        return ("all", [self._value()])

    def _value(self):
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        match = self.VALUE_RE.match(self.text, self.pos)
        if not match:
            self._fail()
        self.pos = match.end()
        return match.lastgroup, match.group()


def _evaluate(node, sound: FakeSound) -> bool:
    kind = node[0]
    if kind == "not":
        return not _evaluate(node[1], sound)
    if kind == "field":
        actual = _field_value(sound, node[1])
        how, values = node[2]
        results = (_matches(actual, value_kind, raw) for value_kind, raw in values)
        return any(results) if how == "any" else all(results)
    results = (_evaluate(child, sound) for child in node[1])
    return any(results) if kind == "any" else all(results)


def compile_filter(text: str):
    """A predicate on FakeSound for a filter as the API receives it."""
    tree = _LuceneParser(server_filter(text)).parse()
    return lambda sound: _evaluate(tree, sound)


###############################################################################
# State ########################################################################
###############################################################################

@dataclass
class Grant:
    client_id: str
    expires_at: float
    redirect_uri: str | None
    challenge: str | None
    method: str | None


@dataclass
class Injected:
    method: str
    path_re: str
    status: int
    body: bytes
    headers: dict
    times: int
    delay_s: float = 0.0
    after: int = 0  # matching requests to let through first


CHAOS_FAULTS = ("drop", "short", "corrupt", "500", "503", "429-minute")


class Chaos:
    """Seeded random faults on a share of downloads, for soak tests."""

    def __init__(self, rate: float, seed: int) -> None:
        import random
        self.rate, self.rng = rate, random.Random(seed)
        self.counts: dict[str, int] = {}

    def pick(self) -> str | None:
        if self.rng.random() >= self.rate:
            return None
        fault = self.rng.choice(CHAOS_FAULTS)
        self.counts[fault] = self.counts.get(fault, 0) + 1
        return fault


class FakeFreesound:
    def __init__(self, sounds: list[FakeSound] | None = None, *, per_minute: int = 100000,
                 per_day: int = 100000, client_id: str = CLIENT_ID,
                 client_secret: str = CLIENT_SECRET, host: str = "127.0.0.1", port: int = 0):
        self.sounds = {sound.id: sound for sound in (sounds or [])}
        self.client_id, self.client_secret = client_id, client_secret
        self.per_minute, self.per_day = per_minute, per_day
        self.suspended = False
        self.grants: dict[str, Grant] = {}
        self.access_tokens: dict[str, dict] = {}   # access -> {"client_id", "expires_at", "refresh"}
        self.refresh_tokens: dict[str, str] = {}   # refresh -> access (revoked on rotation)
        self.throttle_log: dict[str, list[float]] = {}
        self.requests: list[dict] = []
        self.injected: list[Injected] = []
        self.drop_after: dict[int, int] = {}      # sound id -> bytes to send before dropping
        self.pack_drop_after: dict[int, int] = {}  # pack id -> bytes of its zip to send before dropping
        self.corrupt_members: set[int] = set()     # sound ids whose bytes are zeroed inside pack zips
        self._zips: dict[int, bytes] = {}
        self.download_delay_s = 0.0
        self.chaos: Chaos | None = None
        self.token_delay_s = 0.0  # widens the window in which two refreshes could race
        self.access_lifetime_s: float = ACCESS_LIFETIME_S  # what new tokens live (and say in expires_in)
        self.connections = 0      # TCP connections accepted: keep-alive reuse shows here
        self.bookmarks: dict[int, tuple[str, list[int]]] = {}  # category id -> (name, sound ids); 0 = Uncategorized
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------
    @property
    def origin(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def url(self) -> str:
        return f"{self.origin}/apiv2"

    def start(self) -> FakeFreesound:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeFreesound:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers for tests --------------------------------------------------------------
    def add(self, *sounds: FakeSound) -> None:
        for sound in sounds:
            self.sounds[sound.id] = sound

    def issue_code(self, *, challenge: str | None = None, method: str | None = None,
                   age_s: float = 0.0, redirect_uri: str | None = None) -> str:
        code = generate_token()
        with self.lock:
            self.grants[code] = Grant(self.client_id, time.time() + CODE_LIFETIME_S - age_s,
                                      redirect_uri, challenge, method)
        return code

    def issue_token(self) -> dict:
        with self.lock:
            return self._new_token(self.client_id)

    def expire_access_tokens(self) -> None:
        with self.lock:
            for info in self.access_tokens.values():
                info["expires_at"] = time.time() - 1

    def inject(self, path_re: str, status: int, body: dict | str | bytes = b"", *,
               method: str = "GET", headers: dict | None = None, times: int = 1,
               delay_s: float = 0.0, after: int = 0) -> None:
        """Answer the next `times` requests whose path matches `path_re` with this response
        (after `delay_s`, to make the client time out), once `after` of them have passed."""
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        elif isinstance(body, str):
            body = body.encode()
        with self.lock:
            self.injected.append(Injected(method, path_re, status, body, headers or {}, times, delay_s, after))

    def pack_zip(self, pack_id: int) -> bytes:
        """The zip /packs/<id>/download/ serves: `_readme_and_license.txt`, then each moderated
        sound's original under its friendly filename, stored (nginx mod_zip does not compress).
        Sounds in `corrupt_members` go in with the right length and the wrong bytes. Built once
        per pack: set the pack's sounds up before the first request for it."""
        if pack_id not in self._zips:
            self._zips[pack_id] = self._build_zip(pack_id)
        return self._zips[pack_id]

    def _build_zip(self, pack_id: int) -> bytes:
        import io
        import zipfile

        sounds = sorted((s for s in self.sounds.values() if s.pack_id == pack_id and s.moderated),
                        key=lambda s: s.id)
        readme = "".join(f"{s.friendly_filename()}\n  by {s.username}, licence {s.license}\n" for s in sounds)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(zipfile.ZipInfo("_readme_and_license.txt", (2020, 1, 2, 3, 4, 6)), readme)
            for sound in sounds:
                data = sound.data if not sound.path else open(sound.path, "rb").read()
                if sound.id in self.corrupt_members:
                    data = bytes(len(data))
                archive.writestr(zipfile.ZipInfo(sound.friendly_filename(), (2020, 1, 2, 3, 4, 6)), data)
        return buffer.getvalue()

    def requests_to(self, path_re: str, method: str = "GET") -> list[dict]:
        return [r for r in self.requests if r["method"] == method and re.search(path_re, r["path"])]

    def downloads(self) -> list[dict]:
        return self.requests_to(r"/sounds/\d+/download/$")

    # -- internals ---------------------------------------------------------------------
    def _new_token(self, client_id: str) -> dict:
        access, refresh = generate_token(), generate_token()
        self.access_tokens[access] = {"client_id": client_id, "expires_at": time.time() + self.access_lifetime_s,
                                      "refresh": refresh}
        self.refresh_tokens[refresh] = access
        return {"access_token": access, "expires_in": self.access_lifetime_s, "token_type": "Bearer",
                "scope": "read write", "refresh_token": refresh}

    def answers(self, status: int) -> list[dict]:
        return [r for r in self.requests if r.get("status") == status]

    def _take_injected(self, method: str, path: str) -> Injected | None:
        with self.lock:
            for fault in self.injected:
                if fault.method == method and re.search(fault.path_re, path):
                    if fault.after > 0:
                        fault.after -= 1
                        continue
                    fault.times -= 1
                    if fault.times <= 0:
                        self.injected.remove(fault)
                    return fault
        return None

    def _throttle(self, client_id: str) -> str | None:
        """DRF SimpleRateThrottle: sliding logs; throttled requests are not recorded."""
        if self.suspended:
            return "Request was throttled because the ApiV2 credential has been suspended"
        now = time.time()
        with self.lock:
            log = [t for t in self.throttle_log.get(client_id, []) if t > now - 86400]
            if sum(1 for t in log if t > now - 60) >= self.per_minute:
                return f"Request was throttled because of exceeding a request limit rate ({self.per_minute}/minute)"
            if len(log) >= self.per_day:
                return f"Request was throttled because of exceeding a request limit rate ({self.per_day}/day)"
            log.append(now)
            self.throttle_log[client_id] = log
        return None


###############################################################################
# HTTP handler ##################################################################
###############################################################################

def _make_handler(fake: FakeFreesound):
    class Handler(_Handler):
        pass
    Handler.fake = fake
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: don't wait for ACKs
    fake: FakeFreesound

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake.lock:
            self.fake.connections += 1

    # -- plumbing -----------------------------------------------------------------------
    def send_response(self, code: int, message: str | None = None) -> None:
        """Every answer goes through here: note it in the request log."""
        entry = getattr(self, "_entry", None)
        if entry is not None:
            entry.update(status=code, answered_at=time.time())
        super().send_response(code, message)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _html(self, status: int, text: str) -> None:
        self._send(status, text.encode(), {"Content-Type": "text/html; charset=utf-8"})

    def _log(self, query: dict) -> None:
        self._entry = {"method": self.command, "path": urlsplit(self.path).path, "query": query,
                       "headers": dict(self.headers.items()), "at": time.time()}
        with self.fake.lock:
            self.fake.requests.append(self._entry)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        self.form = {}
        if self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode()
            self.form = {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        self._log({**query, **self.form})
        fault = self.fake._take_injected(self.command, parts.path)
        if fault is not None:
            time.sleep(fault.delay_s)
            return self._send(fault.status, fault.body, fault.headers)
        path = parts.path
        if path == "/apiv2/oauth2/access_token/" and self.command == "POST":
            return self._token()
        if re.fullmatch(r"/apiv2/oauth2/authorize/*", path):
            return self._authorize(query)
        if path == "/home/app_permissions/permission_granted/":
            return self._html(200, "<p>Permission granted to application <b>fake</b>!. Your authorization "
                                   "code:</p><div style=\"font-size:14px;font-family:'Courier';\">"
                                   f"{query.get('code')}</div>")
        if self.command != "GET":
            return self._json(405, {"detail": f'Method "{self.command}" not allowed.'})
        if path in SEARCH_PATHS:
            return self._authed(False, lambda: self._search(query))
        match = re.fullmatch(r"/apiv2/sounds/(\d+)/", path)
        if match:
            return self._authed(False, lambda: self._sound(int(match.group(1)), query))
        match = re.fullmatch(r"/apiv2/sounds/(\d+)/download/", path)
        if match:
            return self._authed(True, lambda: self._download(int(match.group(1))))
        match = re.fullmatch(r"/apiv2/previews/(\d+)-(hq|lq)\.(mp3|ogg)", path)
        if match:  # public, like the CDN: no credentials, not throttled
            sound = self.fake.sounds.get(int(match.group(1)))
            if sound is None:
                return self._html(404, "<h1>Not Found</h1>")
            body = sound.preview_bytes(match.group(2), match.group(3))
            return self._send(200, body, {"Content-Type": "audio/mpeg" if match.group(3) == "mp3" else "audio/ogg"})
        match = re.fullmatch(r"/apiv2/packs/(\d+)/download/", path)
        if match:
            return self._authed(True, lambda: self._pack_download(int(match.group(1))))
        match = re.fullmatch(r"/apiv2/(packs|users)/([^/]+)/sounds/", path)
        if match:
            return self._authed(False, lambda: self._owner_sounds(match.group(1), unquote(match.group(2)), query))
        if path == "/apiv2/me/bookmark_categories/":
            return self._authed(True, lambda: self._bookmark_categories(query))
        match = re.fullmatch(r"/apiv2/me/bookmark_categories/(\d+)/sounds/", path)
        if match:
            return self._authed(True, lambda: self._bookmark_sounds(int(match.group(1)), query))
        if path.startswith("/apiv2/") and not path.endswith("/"):
            return self._send(301, b"", {"Location": path + "/"})
        self._html(404, "<h1>Not Found</h1><p>The requested resource was not found on this server.</p>")

    # -- authentication and throttling (DRF: authenticate, then throttle) -----------------
    def _authed(self, oauth_only: bool, handler) -> None:
        fake = self.fake
        auth = self.headers.get("Authorization", "")
        scheme, _, credential = auth.partition(" ")
        client_id = None
        if scheme == "Bearer":
            info = fake.access_tokens.get(credential)
            if info is None or info["expires_at"] < time.time():
                why = "The access token has expired." if info else "The access token is invalid."
                return self._json(401, {"detail": NOT_AUTHENTICATED}, {
                    "WWW-Authenticate": f'Bearer realm="api",error="invalid_token",error_description="{why}"'})
            client_id = info["client_id"]
        elif scheme == "Token" and not oauth_only:
            if credential != fake.client_secret:
                return self._json(401, {"detail": "Invalid token"})
            client_id = fake.client_id
        else:
            return self._json(401, {"detail": NOT_AUTHENTICATED}, {"WWW-Authenticate": 'Bearer realm="api"'})
        throttled = fake._throttle(client_id)
        if throttled:
            return self._json(429, {"detail": throttled})
        handler()

    # -- OAuth2 ---------------------------------------------------------------------------
    def _authorize(self, query: dict) -> None:
        """Auto-approves as a logged-in user, then redirects with code and state."""
        fake = self.fake
        if query.get("client_id") != fake.client_id:
            return self._html(400, "<p>Error: Invalid client_id parameter value.</p>")
        redirect = query.get("redirect_uri") or f"{fake.origin}/home/app_permissions/permission_granted/"
        if query.get("response_type") != "code":
            return self._send(302, b"", {"Location": f"{redirect}?error=unsupported_response_type"})
        challenge = query.get("code_challenge")
        code = fake.issue_code(challenge=challenge, method=query.get("code_challenge_method") or
                               ("plain" if challenge else None), redirect_uri=query.get("redirect_uri"))
        params = {"code": code, **({"state": query["state"]} if "state" in query else {})}
        self._send(302, b"", {"Location": f"{redirect}?{urlencode(params)}"})

    def _client_auth(self) -> str | None:
        """Public client: client_id alone is enough; a secret, if sent, must be right."""
        fake, form = self.fake, self.form
        client_id, secret = form.get("client_id"), form.get("client_secret")
        basic = self.headers.get("Authorization", "")
        if basic.startswith("Basic "):
            client_id, _, secret = b64decode(basic[6:]).decode().partition(":")
        if client_id != fake.client_id or (secret is not None and secret != fake.client_secret):
            return None
        return client_id

    def _token(self) -> None:
        fake, form = self.fake, self.form
        client_id = self._client_auth()
        if client_id is None:
            return self._json(401, {"error": "invalid_client"}, {"WWW-Authenticate": 'Bearer error="invalid_client"'})
        grant_type = form.get("grant_type")
        with fake.lock:
            if grant_type == "authorization_code":
                return self._code_grant(client_id)
            if grant_type == "refresh_token":
                time.sleep(fake.token_delay_s)
                access = fake.refresh_tokens.pop(form.get("refresh_token", ""), None)
                if access is None:
                    return self._json(400, {"error": "invalid_grant"})
                fake.access_tokens.pop(access, None)  # rotation revokes the old pair
                return self._json(200, fake._new_token(client_id))
        if grant_type in ("password", "client_credentials", "implicit"):
            return self._json(400, {"error": "unauthorized_client"})
        self._json(400, {"error": "unsupported_grant_type"})

    def _code_grant(self, client_id: str) -> None:
        fake, form = self.fake, self.form
        if "code" not in form:
            return self._json(400, {"error": "invalid_request", "error_description": "Missing code parameter."})
        grant = fake.grants.pop(form["code"], None)  # single use
        if grant is None or grant.expires_at < time.time() or grant.client_id != client_id:
            return self._json(400, {"error": "invalid_grant"})
        if grant.challenge:
            verifier = form.get("code_verifier")
            if not verifier:
                return self._json(400, {"error": "invalid_request", "error_description": "Code verifier required."})
            expected = verifier if grant.method == "plain" else urlsafe_b64encode(
                hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if expected != grant.challenge:
                return self._json(400, {"error": "invalid_grant"})
        if grant.redirect_uri and form.get("redirect_uri") not in (None, grant.redirect_uri):
            return self._json(400, {"error": "invalid_request", "error_description": "Mismatching redirect URI."})
        self._json(200, fake._new_token(client_id))

    # -- search ---------------------------------------------------------------------------
    def _search(self, query: dict) -> None:
        fake = self.fake
        text = unquote(query.get("query", "")).strip().strip("\"'").strip()
        filter_text = unquote(query["filter"]) if "filter" in query else None
        if filter_text is not None and not filter_text.strip():
            return self._json(400, {"detail": "Invalid filter."})
        try:
            predicate = compile_filter(filter_text) if filter_text else (lambda sound: True)
        except FilterError as exc:
            return self._json(400, {"detail": "Search server error: Solr responded with an error (HTTP 400): "
                                              f"[Reason: {exc}] (please check that your filter syntax and "
                                              "field names are correct)"})
        page = _int(query.get("page"), 1)
        page_size = min(_int(query.get("page_size"), 15), 150)
        if page < 1 or page_size < 1:
            return self._json(404, {"detail": "Not found"})
        if "similar_to" in query:
            similar = self._similar(query)
            if similar is None:
                return
            hits = [s for s in similar if predicate(s)]
        else:
            words = text.lower().split()
            hits = [s for s in fake.sounds.values() if predicate(s) and all(_text_match(s, w) for w in words)]
            try:
                hits = _sort(hits, query.get("sort", "score"))
            except ValueError:
                return self._json(400, {"detail": "Invalid sort parameter"})  # [our wording; the notes give none]
        count = len(hits)
        if count and page > math.ceil(count / page_size):
            return self._json(404, {"detail": "Not found"})
        fields = query.get("fields")
        field_list = fields.split(",") if fields else None
        results = [s.as_json(fake.url, field_list) for s in hits[(page - 1) * page_size: page * page_size]]
        more = page * page_size < count
        link = self._search_link(text=query.get("query", ""), filter_text=query.get("filter"),
                                 sort=query.get("sort"), page_size=page_size, fields=fields,
                                 similar=[(k, query[k]) for k in ("similar_to", "similarity_space") if query.get(k)])
        self._json(200, {"count": count, "previous": link(page - 1) if page > 1 else None,
                         "next": link(page + 1) if more else None, "results": results})

    def _similar(self, query: dict) -> list[FakeSound] | None:
        """similar_to=<id>: the other sounds at cosine similarity >= 0.7 in the space, closest
        first; an unknown id gives none. None when the error answer has been sent."""
        target_text, space = query["similar_to"].strip(), query.get("similarity_space") or "laion_clap"
        if not target_text.isdigit():
            self._json(400, {"detail": "The 'similar_to' parameter is not a valid sound ID"})
            return None
        if space not in ("laion_clap", "freesound_classic"):  # [our guess: the notes name only these two]
            self._json(400, {"detail": f"Invalid similarity space '{space}'"})
            return None
        target = self.fake.sounds.get(int(target_text))
        if target is None or space not in target.vectors:
            return []
        scored = [(_cosine(target.vectors[space], s.vectors[space]), s) for s in self.fake.sounds.values()
                  if s is not target and space in s.vectors]
        return [s for score, s in sorted(scored, key=lambda pair: (-pair[0], pair[1].id)) if score >= 0.7]

    def _search_link(self, *, text, filter_text, sort, page_size, fields, similar=()):
        """forms.construct_link: '?&query=..&filter=..&weights=&sort=..&page=..&page_size=..&fields=..'
        then similar_to and similarity_space when set."""
        def link(page: int) -> str:
            out = f"?&query={quote(text, safe=QUOTE_SAFE)}"
            if filter_text:
                out += f"&filter={quote(filter_text, safe=QUOTE_SAFE)}"
            out += "&weights="
            if sort and sort != "score":
                out += f"&sort={sort}"
            out += f"&page={page}"
            if page_size != 15:
                out += f"&page_size={page_size}"
            if fields:
                out += f"&fields={quote(fields, safe=QUOTE_SAFE)}"
            out += "".join(f"&{key}={value}" for key, value in similar)
            return f"{self.fake.url}/search/{out}"
        return link

    # -- DRF lists: pack and user sounds, bookmark categories ---------------------------------
    def _drf_page(self, items: list, query: dict, render) -> None:
        """PageNumberPagination: next/previous keep every query param; bad pages 404."""
        size = _int(query.get("page_size"), 15)
        size = 15 if size < 1 else min(size, 150)
        page = query.get("page", "1")
        pages = max(1, math.ceil(len(items) / size))
        page = pages if page == "last" else _int(page, 0)
        if not 1 <= page <= pages:
            return self._json(404, {"detail": "Invalid page."})

        def link(number: int) -> str:
            params = {**query, "page": str(number)}
            if number == 1:
                params.pop("page")
            return f"{self.fake.origin}{urlsplit(self.path).path}?{urlencode(params)}"
        self._json(200, {"count": len(items), "next": link(page + 1) if page < pages else None,
                         "previous": link(page - 1) if page > 1 else None,
                         "results": [render(item) for item in items[(page - 1) * size: page * size]]})

    def _owner_sounds(self, kind: str, owner: str, query: dict) -> None:
        sounds = sorted((s for s in self.fake.sounds.values() if s.moderated), key=lambda s: -s.id)  # -created
        sounds = [s for s in sounds if (str(s.pack_id) == owner if kind == "packs" else s.username == owner)]
        if not sounds:
            return self._json(404, {"detail": "Not found"})
        fields = query["fields"].split(",") if query.get("fields") else None
        self._drf_page(sounds, query, lambda s: s.as_json(self.fake.url, fields))

    def _bookmark_categories(self, query: dict) -> None:
        categories = sorted(self.fake.bookmarks.items())
        self._drf_page(categories, query, lambda item: {
            "id": item[0], "url": f"{self.fake.url}/me/bookmark_categories/{item[0]}/", "name": item[1][0],
            "num_sounds": len(item[1][1]), "sounds": f"{self.fake.url}/me/bookmark_categories/{item[0]}/sounds/"})

    def _bookmark_sounds(self, category: int, query: dict) -> None:
        if category not in self.fake.bookmarks:
            return self._json(404, {"detail": "Not found"})
        fields = query["fields"].split(",") if query.get("fields") else None
        sounds = [self.fake.sounds[i] for i in self.fake.bookmarks[category][1]]
        self._drf_page(sounds, query, lambda s: s.as_json(self.fake.url, fields))

    def _sound(self, sound_id: int, query: dict) -> None:
        sound = self.fake.sounds.get(sound_id)
        if sound is None:
            return self._json(404, {"detail": "No Sound matches the given query."})
        fields = query.get("fields")
        default = ["id", "url", "name", "tags", "description", "created", "license", "type", "channels",
                   "filesize", "bitrate", "bitdepth", "duration", "samplerate", "username", "pack",
                   "pack_name", "download", "previews", "num_downloads", "md5"]
        self._json(200, sound.as_json(self.fake.url, fields.split(",") if fields else default))

    # -- download ---------------------------------------------------------------------------
    def _download(self, sound_id: int) -> None:
        fake = self.fake
        sound = fake.sounds.get(sound_id)
        if sound is None or not sound.moderated:
            return self._json(404, {"detail": "Not found"})
        if fake.chaos is not None:
            with fake.lock:
                chaos = fake.chaos.pick()
            if chaos is not None and self._chaos(chaos, sound):
                return
        size, start = sound.size, 0
        headers = {"Content-Type": "application/octet-stream",
                   "Content-Disposition": f'attachment; filename="{sound.friendly_filename()}"',
                   "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "").strip())
        status = 200
        if match:  # what nginx does for the real server
            start = int(match.group(1))
            if start >= size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(size - start)}.items():
            self.send_header(key, value)
        self.end_headers()
        if fake.download_delay_s:
            time.sleep(fake.download_delay_s)
        cut = fake.drop_after.pop(sound_id, None)
        end = size if cut is None else min(size, start + cut)
        if sound.path:
            with open(sound.path, "rb") as handle:
                self.connection.sendfile(handle, start, end - start)
        else:
            self.wfile.write(sound.data[start:end])
        if cut is not None:  # drop the connection mid-body
            self.close_connection = True


    def _pack_download(self, pack_id: int) -> None:
        """nginx mod_zip's answer to DownloadPack: a stored zip of the readme and the originals
        under their friendly names, with Content-Length and Range (the CRCs are known)."""
        fake = self.fake
        sounds = sorted((s for s in fake.sounds.values() if s.pack_id == pack_id), key=lambda s: s.id)
        if not sounds:
            return self._json(404, {"detail": "Not found"})
        if not any(s.moderated for s in sounds):
            return self._json(404, {"detail": f"Sounds in pack {pack_id} have not yet been described or moderated"})
        body = fake.pack_zip(pack_id)
        first = sounds[0]
        name = f"{pack_id}__{slugify(first.username)}__{slugify(first.pack_name or '')}.zip"
        self._send_ranged(body, {"Content-Type": "application/zip",
                                 "Content-Disposition": f'attachment; filename="{name}"'},
                          fake.pack_drop_after.pop(pack_id, None))

    def _send_ranged(self, body: bytes, headers: dict, cut: int | None) -> None:
        """200, or 206 for `Range: bytes=N-` as nginx answers it; `cut` drops the connection
        after that many bytes of the body."""
        size, start, status = len(body), 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "").strip())
        if match:
            start = int(match.group(1))
            if start >= size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{size - 1}/{size}"}
        self.send_response(status)
        for key, value in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(size - start)}.items():
            self.send_header(key, value)
        self.end_headers()
        end = size if cut is None else min(size, start + cut)
        self.wfile.write(body[start:end])
        if cut is not None:
            self.close_connection = True

    def _chaos(self, fault: str, sound: FakeSound) -> bool:
        """Apply one chaos fault; True if the response was sent (False: serve it normally)."""
        if fault in ("500", "503"):
            self._json(int(fault), {"detail": "Server error"})
        elif fault == "429-minute":  # the real body: no Retry-After
            self._json(429, {"detail": "Request was throttled because of exceeding a request limit rate "
                                       f"({self.fake.per_minute}/minute)"})
        elif fault == "drop":
            self.fake.drop_after[sound.id] = len(sound.data) // 2
            return False
        else:  # "short": a consistent but truncated body; "corrupt": right length, wrong bytes
            body = sound.data[: len(sound.data) // 2] if fault == "short" else bytes(len(sound.data))
            self._send(200, body, {"Content-Type": "application/octet-stream"})
        return True


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _text_match(sound: FakeSound, word: str) -> bool:
    haystack = " ".join([sound.name, sound.description, sound.username, str(sound.id), *sound.tags]).lower()
    return word in haystack


def _cosine(a, b) -> float:
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / norms if norms else 0.0


def _sort(hits: list[FakeSound], sort: str) -> list[FakeSound]:
    """The named orders; `bpm:120,brightness:80` is closest first (euclidean), sounds
    without those descriptors last. ValueError for a malformed target list."""
    if ":" in sort:
        targets = []
        for pair in sort.split(","):
            name, _, value = pair.partition(":")
            if name not in NUMERIC_DESCRIPTORS:
                raise ValueError(name)
            targets.append((name, float(value)))

        def distance(sound: FakeSound) -> float:
            values = [sound.descriptor(name) for name, _ in targets]
            if None in values:
                return math.inf
            return math.sqrt(sum((v - t) ** 2 for v, (_, t) in zip(values, targets, strict=True)))
        return sorted(hits, key=lambda s: (distance(s), s.id))
    keys = {"duration": lambda s: s.duration, "created": lambda s: s.id, "downloads": lambda s: 0,
            "rating": lambda s: 0}
    field_name, _, direction = sort.rpartition("_")
    if field_name in keys and direction in ("asc", "desc"):
        return sorted(hits, key=keys[field_name], reverse=direction == "desc")
    return sorted(hits, key=lambda s: s.id)  # "score", and unknown values fall back to it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--sounds", type=int, default=20, help="how many fake sounds to serve")
    args = parser.parse_args()
    fake = FakeFreesound(make_sounds(args.sounds), port=args.port)
    print(f"Fake Freesound at {fake.url} with {args.sounds} sounds (ids 1000-{999 + args.sounds}).\n"
          f"  export FREESOUND_API_URL={fake.url}\n"
          f"  export FREESOUND_CLIENT_ID={fake.client_id}\n"
          f"  export FREESOUND_CLIENT_SECRET={fake.client_secret}\n"
          f"  export FREESOUND_STATE_DIR=/tmp/fake-freesound-state\n"
          f"  python download_freesound_library.py -q rain -o /tmp/fake-sounds --rate 600\n"
          "When it asks, open the URL it prints (curl -si URL shows the redirect with the code), "
          "or paste this ready code (valid 10 minutes, once): " + fake.issue_code(), flush=True)
    fake._server.serve_forever()


if __name__ == "__main__":
    main()
