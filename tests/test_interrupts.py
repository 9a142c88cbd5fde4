"""Ctrl-C and SIGTERM during real downloads, one or several in flight: the documented exit
code, nothing incomplete under a final name, metadata valid, and the next run finishes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST, SCRIPT

IDS = ["1000", "1001", "1002", "1003", "1004", "1005"]


def _start_and_signal(env, signum: int, jobs: int) -> subprocess.CompletedProcess:
    env.login()
    env.fake.download_delay_s = 1.0  # headers sent, body held back: the run is mid-download
    argv = [sys.executable, str(SCRIPT), *FAST, "--jobs", str(jobs), "--ids", *IDS, "--output-dir", str(env.out)]
    proc = subprocess.Popen(argv, env=env.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while len(env.fake.downloads()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # one download done and one in flight (jobs 1), or several in flight
    time.sleep(0.2)
    signalled_at = time.time()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=20)
    late = [r["path"] for r in env.fake.requests if r["at"] > signalled_at]
    assert late == [], "requests started after the signal"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("jobs", [1, 4])
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_download_exits_cleanly_and_the_next_run_finishes(env, signum, code, jobs):
    result = _start_and_signal(env, signum, jobs)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    entries = json.loads((env.out / "metadata.json").read_text()) if (env.out / "metadata.json").exists() else []
    if jobs == 1:
        assert [e["id"] for e in entries] == [1000]  # the first finished, the second was cut off
    # Whatever stands under a final name is complete and recorded; the rest are .part files.
    finals = [n for n in env.audio_files() if not n.endswith(".part")]
    assert sorted(finals) == sorted(e["file"] for e in entries)
    for entry in entries:
        assert (env.out / entry["file"]).read_bytes() == env.fake.sounds[entry["id"]].data
    assert len(env.fake.downloads()) < len(IDS)  # it really was interrupted
    env.fake.download_delay_s = 0
    again = env.run("--ids", *IDS)
    assert again.returncode == 0, again.output
    for sound_id in map(int, IDS):
        sound = env.fake.sounds[sound_id]
        assert (env.out / sound.friendly_filename()).read_bytes() == sound.data
    assert not [p for p in env.out.iterdir() if p.name.endswith(".part")]
    assert len(json.loads((env.out / "metadata.json").read_text())) == len(IDS)
