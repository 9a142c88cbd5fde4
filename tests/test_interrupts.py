"""Ctrl-C and SIGTERM during a real download: the documented exit code, no broken file."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST, SCRIPT


def _start_and_signal(env, signum: int) -> subprocess.CompletedProcess:
    env.login()
    env.fake.download_delay_s = 1.0  # headers sent, body held back: the run is mid-download
    argv = [sys.executable, str(SCRIPT), *FAST, "--ids", "1000", "1001", "--output-dir", str(env.out)]
    proc = subprocess.Popen(argv, env=env.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while len(env.fake.downloads()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # wait for the second download to start, the first being done
    time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=20)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_download_exits_cleanly_and_the_next_run_finishes(env, signum, code):
    result = _start_and_signal(env, signum)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    finished = env.fake.sounds[1000].friendly_filename()
    # The first sound is whole and recorded; the second never appears under its final name.
    assert [e["id"] for e in json.loads((env.out / "metadata.json").read_text())] == [1000]
    assert (env.out / finished).read_bytes() == env.fake.sounds[1000].data
    assert not (env.out / env.fake.sounds[1001].friendly_filename()).exists()
    env.fake.download_delay_s = 0
    again = env.run("--ids", "1000", "1001")
    assert again.returncode == 0, again.output
    assert (env.out / env.fake.sounds[1001].friendly_filename()).read_bytes() == env.fake.sounds[1001].data
    assert not [p for p in env.out.iterdir() if p.name.endswith(".part")]
