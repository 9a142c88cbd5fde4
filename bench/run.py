#!/usr/bin/env python3
"""Benchmark download_freesound_library.py against baselines, side by side, on loopback.

Starts the fake Freesound server from tests/, runs the real script as a subprocess, and runs
each baseline in the same session, so ratios compare like with like on a noisy machine:

    python bench/run.py            # the full figures (1 GiB originals; a few minutes)
    python bench/run.py --quick    # small sizes, seconds (the test suite runs this)

Prints one Markdown table and writes bench/results.json (or --results PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fake_freesound import CLIENT_ID, CLIENT_SECRET, FakeFreesound, FakeSound, make_sounds  # noqa: E402

SCRIPT = ROOT / "download_freesound_library.py"
BASELINE = ROOT / "bench" / "baseline_freesound_client.py"
UNLIMITED = ["--daily-cap", "1000000", "--api-daily-cap", "1000000"]
PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


@dataclass
class Row:
    measure: str
    unit: str
    ours: list[float]
    baseline: list[float]
    baseline_name: str
    goal: str
    met: bool

    @staticmethod
    def _fmt(values: list[float]) -> str:
        if not values:
            return "n/a"
        med = statistics.median(values)
        return f"{med:.3g} [{min(values):.3g}–{max(values):.3g}]" if len(values) > 1 else f"{med:.3g}"

    @property
    def ratio(self) -> float | None:
        if not self.ours or not self.baseline or not statistics.median(self.baseline):
            return None
        return statistics.median(self.ours) / statistics.median(self.baseline)

    def markdown(self) -> str:
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else "n/a"
        return (f"| {self.measure} | {self._fmt(self.ours)} {self.unit} | {self._fmt(self.baseline)} {self.unit} "
                f"({self.baseline_name}) | {ratio} | {self.goal} | {'yes' if self.met else 'NO'} |")


class Session:
    """One fake server and scratch folders; runs our script and the baselines against it."""

    def __init__(self, fake: FakeFreesound, scratch: Path) -> None:
        self.fake, self.scratch = fake, scratch
        self.token = fake.issue_token()["access_token"]

    def fresh(self) -> tuple[Path, Path]:
        out, state = Path(tempfile.mkdtemp(dir=self.scratch)), Path(tempfile.mkdtemp(dir=self.scratch))
        token = {"access_token": self.token, "refresh_token": "unused", "expires_in": 86400,
                 "token_type": "Bearer", "scope": "read write", "expires_at": time.time() + 86400,
                 "client_id": CLIENT_ID}
        (state / "token.json").write_text(json.dumps(token))
        return out, state

    def env(self, state: Path) -> dict:
        return {**os.environ, "FREESOUND_API_URL": self.fake.url, "FREESOUND_CLIENT_ID": CLIENT_ID,
                "FREESOUND_CLIENT_SECRET": CLIENT_SECRET, "FREESOUND_STATE_DIR": str(state)}

    def ours(self, *args: str) -> list[str]:
        out, state = self.fresh()
        self._state = state
        return [sys.executable, str(SCRIPT), "--output-dir", str(out), "--quiet", *UNLIMITED, *args]

    def baseline(self, *args: str) -> list[str]:
        out, _ = self.fresh()
        return [sys.executable, str(BASELINE), "--api", self.fake.url, "--token", self.token,
                "--out", str(out), *args]

    def run(self, argv: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(argv, env=self.env(getattr(self, "_state", self.scratch)), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return time.perf_counter() - started

    def peak_rss_mib(self, argv: list[str]) -> float:
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], env=self.env(self._state),
                                check=True, capture_output=True, text=True)
        return int(result.stdout.strip()) / 1024  # ru_maxrss is in KiB on Linux

    def requests_per_sound(self, argv: list[str], sounds: int) -> float:
        before = len(self.fake.requests)
        self.run(argv)
        made = [r for r in self.fake.requests[before:] if "/oauth2/" not in r["path"]]
        return len(made) / sounds

    def start_span(self, argv: list[str]) -> float:
        before = len(self.fake.downloads())
        self.run(argv)
        starts = [r["at"] for r in self.fake.downloads()[before:]]
        return max(starts) - min(starts)


def economy_rows(scratch: Path, sounds: int, runs: int) -> list[Row]:
    with FakeFreesound(make_sounds(sounds, start_id=100_000, size=64)) as fake:
        bench = Session(fake, scratch)
        ids = [str(i) for i in range(100_000, 100_000 + sounds)]
        fast = ["--rate", "600000", "--api-rate", "600000"]
        rows = []
        for name, ours_args, base_args in (
                (f"requests per sound, {sounds}-ID list", ["--ids", *ids], ["--ids", *ids]),
                (f"requests per sound, {sounds}-result search", ["--query", ""], ["--query", ""])):
            ours = [bench.requests_per_sound(bench.ours(*ours_args, *fast), sounds) for _ in range(runs)]
            base = [bench.requests_per_sound(bench.baseline(*base_args), sounds) for _ in range(runs)]
            rows.append(Row(name, "req", ours, base, "get_sound + retrieve", "≤ 1.02",
                            statistics.median(ours) <= 1.02))
        return rows


def pacing_rows(scratch: Path, downloads: int, runs: int) -> list[Row]:
    rate = 600
    ideal = (downloads - 1) * 60 / rate
    rows = []
    for regime, delay in (("transfer 20 ms", 0.02), ("transfer 300 ms", 0.3)):
        with FakeFreesound(make_sounds(downloads, start_id=200_000, size=1024)) as fake:
            fake.download_delay_s = delay
            bench = Session(fake, scratch)
            ids = [str(i) for i in range(200_000, 200_000 + downloads)]
            ours = [ideal / bench.start_span(bench.ours("--ids", *ids, "--rate", str(rate), "--api-rate", str(rate)))
                    for _ in range(runs)]
            base = [ideal / bench.start_span(bench.baseline("--ids", *ids, "--sleep-after", str(60 / rate)))
                    for _ in range(runs)]
            rows.append(Row(f"pacing efficiency, {downloads} downloads at --rate {rate}, {regime}", "", ours, base,
                            "sleep after each file", "≥ 0.95", statistics.median(ours) >= 0.95))
    return rows


def big_file(scratch: Path, size: int) -> Path:
    path = scratch / "original.bin"
    block = os.urandom(1 << 20)
    with path.open("wb") as handle:
        for index in range(size >> 20):
            handle.write(index.to_bytes(8, "little") + block[8:])
    return path


def transfer_rows(scratch: Path, size: int, runs: int) -> list[Row]:
    path = big_file(scratch, size)
    sound = FakeSound(id=300_000, name="big original.wav", username="bench", path=str(path))
    label = f"{size >> 20} MiB original"
    with FakeFreesound([sound]) as fake:
        bench = Session(fake, scratch)
        _ = sound.md5  # hashed once here, not inside a timed run
        ours_argv = lambda: bench.ours("--ids", "300000")  # noqa: E731
        rss = [bench.peak_rss_mib(ours_argv()) for _ in range(runs)]
        base_rss = [bench.peak_rss_mib(bench.baseline("--ids", "300000")) for _ in range(runs)]
        rows = [Row(f"peak RSS, {label}", "MiB", rss, base_rss, "client Sound.retrieve", "≤ 64 MiB",
                    statistics.median(rss) <= 64)]
        curl = shutil.which("curl")
        ours_s = [bench.run(ours_argv()) for _ in range(runs)]
        curl_s = []
        if curl:
            url = f"{fake.url}/sounds/300000/download/"
            for _ in range(runs):
                out = Path(tempfile.mkdtemp(dir=scratch)) / "curl.bin"
                curl_s.append(bench.run([curl, "-sf", "-o", str(out),
                                         "-H", f"Authorization: Bearer {bench.token}", url]))
        ratio_ok = bool(curl_s) and statistics.median(ours_s) <= 1.3 * statistics.median(curl_s)
        rows.append(Row(f"wall time, {label} (whole run vs one curl GET)", "s", ours_s, curl_s, "curl",
                        "≤ 1.3 × curl", ratio_ok))
        return rows


def pack_rows(scratch: Path, sound_size: int, runs: int) -> list[Row]:
    """A 20-sound pack, all new, at the default --rate: one zip against sound by sound."""
    sounds = [FakeSound(id=400_000 + n, name=f"take {n}.wav", username="bench", pack_id=4, pack_name="Bench pack",
                        data=os.urandom(sound_size)) for n in range(20)]
    ids = [str(sound.id) for sound in sounds]
    with FakeFreesound(sounds) as fake:
        bench = Session(fake, scratch)
        zip_size = len(fake.pack_zip(4))  # built once here, not inside a timed run
        requests = [bench.requests_per_sound(bench.ours("--pack", "4"), 1) for _ in range(runs)]
        one_by_one = [bench.requests_per_sound(bench.ours("--ids", *ids, "--rate", "600000", "--api-rate", "600000"),
                                               1) for _ in range(runs)]
        rows = [Row("API requests, 20-sound pack", "req", requests, one_by_one, "sound by sound", "≤ 3",
                    statistics.median(requests) <= 3)]
        ours_s = [bench.run(bench.ours("--pack", "4")) for _ in range(runs)]
        curl, curl_s = shutil.which("curl"), []
        for _ in range(runs if curl else 0):
            out = Path(tempfile.mkdtemp(dir=scratch)) / "pack.zip"
            curl_s.append(bench.run([str(curl), "-sf", "-o", str(out), "-H", f"Authorization: Bearer {bench.token}",
                                     f"{fake.url}/packs/4/download/"]))
        met = bool(curl_s) and statistics.median(ours_s) <= 1.5 * statistics.median(curl_s)
        rows.append(Row(f"wall time, 20-sound pack at the default --rate ({zip_size >> 20} MiB zip vs one curl GET)",
                        "s", ours_s, curl_s, "curl", "≤ 1.5 × curl", met))
        return rows


def make_library(folder: Path, size: int) -> list[str]:
    """A library of `size` sounds as the program leaves it: tiny audio files, metadata.json
    one sound per line (about 740 bytes each, like real entries), ATTRIBUTION.txt."""
    sys.path.insert(0, str(ROOT))
    from download_freesound_library import attribution_text, metadata_line, metadata_text

    folder.mkdir(parents=True)
    entries = []
    for n in range(size):
        sound_id, name = 10_000_000 + n, f"{10_000_000 + n}__recordist-{n % 97}__take-{n}.wav"
        (folder / name).write_bytes(b"RIFF")
        entries.append({
            "id": sound_id, "name": f"Take {n}.wav", "username": f"recordist {n % 97}", "file": name,
            "license": "https://creativecommons.org/licenses/by/4.0/", "license_name": "CC BY 4.0",
            "url": f"https://freesound.org/s/{sound_id}/", "duration": 12.5, "samplerate": 48000.0,
            "bitdepth": 24, "channels": 2, "type": "wav", "filesize": 4, "md5": "0" * 32,
            "tags": ["field-recording", "rain", "roof", "tin", "storm", "night", "zoom-h6"],
            "description": "Rain on a tin roof at night, recorded with a pair of omnis. " * 5,
            "pack_name": "Storms", "created": "2020-01-02T03:04:05Z", "category": "Soundscapes",
            "subcategory": "Nature", "gen_ai_preference": "no-additional-preferences",
            "downloaded_at": "2026-01-01T00:00:00Z"})
    (folder / "metadata.json").write_text(metadata_text(metadata_line(e) for e in entries))
    (folder / "ATTRIBUTION.txt").write_text(attribution_text(entries))
    return [str(e["id"]) for e in entries]


def library_rows(scratch: Path, size: int, runs: int) -> list[Row]:
    """What a download adds to a big library, a run with nothing new, and peak RSS."""
    new = make_sounds(30, start_id=500_000, size=1024)
    with FakeFreesound(new) as fake:
        bench = Session(fake, scratch)
        big = scratch / "big-library"
        ids = make_library(big, size)
        (scratch / "library-ids.txt").write_text("\n".join(ids) + "\n")
        fast = ["--rate", "6000000", "--api-rate", "6000000", "--jobs", "1"]

        def into(library: Path | None, *args: str) -> list[str]:
            """Our argv, its output folder a hard-linked copy of `library`: each run starts alike."""
            argv = bench.ours(*args)
            if library is not None:
                out = Path(argv[argv.index("--output-dir") + 1])
                shutil.rmtree(out)
                shutil.copytree(library, out, copy_function=os.link)
            return argv

        def per_download_ms(library: Path | None) -> float:
            many, one = (bench.run(into(library, "--ids", *[str(s.id) for s in new[:count]], *fast))
                         for count in (30, 1))
            return (many - one) / 29 * 1000

        empty = [per_download_ms(None) for _ in range(runs)]
        loaded = [per_download_ms(big) for _ in range(runs)]
        goal = 1.3 * statistics.median(empty) + 5
        ids_file = str(scratch / "library-ids.txt")
        nothing_new = [bench.run(into(big, "--ids-file", ids_file)) for _ in range(runs)]
        rss = [bench.peak_rss_mib(into(big, "--ids-file", ids_file)) for _ in range(runs)]
        rss.append(bench.peak_rss_mib(into(big, "--ids", *[str(s.id) for s in new], *fast)))
        return [
            Row(f"ms a download adds, {size}-sound library vs empty folder", "ms", loaded, empty, "empty folder",
                f"≤ 1.3 × empty + 5 ms ({goal:.3g})", statistics.median(loaded) <= goal),
            Row(f"run with nothing new, {size}-sound library", "s", nothing_new, [], "", "≤ 0.5 s",
                statistics.median(nothing_new) <= 0.5),
            Row(f"peak RSS, {size}-sound library (nothing new; 30 new)", "MiB", rss, [], "", "≤ 80 MiB",
                max(rss) <= 80),
        ]


def startup_row(runs: int) -> Row:
    def timed(argv: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    ours = [timed([sys.executable, str(SCRIPT), "--help"]) for _ in range(runs)]
    bare = [timed([sys.executable, "-c", "pass"]) for _ in range(runs)]
    extra = statistics.median(ours) - statistics.median(bare)
    return Row("start-up, --help", "s", ours, bare, "python -c pass", "< +0.25 s", extra < 0.25)


def chunk_sweep(scratch: Path, size: int, runs: int) -> None:
    """MiB/s of the script's download loop (iter_content, file write, background md5) per chunk size."""
    import hashlib

    import requests

    sys.path.insert(0, str(ROOT))
    from download_freesound_library import BackgroundMd5

    path = big_file(scratch, size)
    sound = FakeSound(id=1, name="x.wav", username="u", path=str(path))
    with FakeFreesound([sound]) as fake:
        token = fake.issue_token()["access_token"]
        url = f"{fake.url}/sounds/1/download/"
        print(f"| chunk size | MiB/s, {size >> 20} MiB over loopback (median of {runs}) |\n|---|---|")
        with requests.Session() as http:
            for chunk in (16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20):
                speeds = []
                for _ in range(runs):
                    started = time.perf_counter()
                    with http.get(url, headers={"Authorization": f"Bearer {token}"}, stream=True) as response, \
                            (scratch / "out.bin").open("wb") as handle, BackgroundMd5(hashlib.md5()) as digest:
                        for block in response.iter_content(chunk):
                            handle.write(block)
                            digest.update(block)
                    assert digest.hexdigest() == sound.md5
                    speeds.append(size / (1 << 20) / (time.perf_counter() - started))
                print(f"| {chunk >> 10} KiB | {statistics.median(speeds):.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and one run each: a smoke test")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, or 1 with --quick)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--chunks", action="store_true", help="only measure the download loop per chunk size")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    if args.chunks:
        scratch = Path(tempfile.mkdtemp(prefix="freesound-bench-"))
        try:
            chunk_sweep(scratch, 32 << 20 if args.quick else 512 << 20, runs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return 0
    sounds, downloads, size, pack_sound, library = ((20, 8, 8 << 20, 64 << 10, 500) if args.quick
                                                    else (300, 40, 1 << 30, 16 << 20, 20_000))
    scratch = Path(tempfile.mkdtemp(prefix="freesound-bench-"))
    try:
        rows = [*economy_rows(scratch, sounds, runs), *pacing_rows(scratch, downloads, runs),
                *transfer_rows(scratch, size, runs), *pack_rows(scratch, pack_sound, runs),
                *library_rows(scratch, library, runs), startup_row(max(runs, 5))]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, median [min–max] of {runs} run(s).\n")
    print("| measure | ours | baseline | ratio | goal | met |\n|---|---|---|---|---|---|")
    print("\n".join(row.markdown() for row in rows))
    Path(args.results).write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "runs": runs, "quick": args.quick,
         "rows": [{**asdict(row), "ratio": row.ratio} for row in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
