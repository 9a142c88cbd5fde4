"""Shared fixtures: the fake Freesound server and a runner for the real script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_freesound import CLIENT_ID, CLIENT_SECRET, FakeFreesound, make_sounds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "download_freesound_library.py"
FAST = ["--rate", "60000", "--api-rate", "60000", "--backoff", "0.01"]

# Every secret the suite's runs could leak; each run's output is checked for them.
SEEN_SECRETS: set[str] = {CLIENT_SECRET}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f"--- exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def assert_no_secrets(fake: FakeFreesound | None, *texts: str) -> None:
    if fake is not None:
        SEEN_SECRETS.update(fake.access_tokens)
        SEEN_SECRETS.update(fake.refresh_tokens)
    for text in texts:
        for secret in SEEN_SECRETS:
            assert secret not in text, "a secret appeared in the program's output"


class Env:
    """One test's world: a fake server, an output folder, a state folder."""

    def __init__(self, fake: FakeFreesound, tmp_path: Path) -> None:
        self.fake = fake
        self.out = tmp_path / "sounds"
        self.state = tmp_path / "state"
        self.environ = {**os.environ, "FREESOUND_API_URL": fake.url, "FREESOUND_CLIENT_ID": CLIENT_ID,
                        "FREESOUND_CLIENT_SECRET": CLIENT_SECRET, "FREESOUND_STATE_DIR": str(self.state)}
        self.environ.pop("OAUTHLIB_INSECURE_TRANSPORT", None)

    def run(self, *args: str, stdin: str = "", fast: bool = True, env: dict | None = None,
            timeout: float = 60) -> Result:
        # FAST first, so that a test's own --rate etc. wins (argparse keeps the last).
        argv = [sys.executable, str(SCRIPT), *(FAST if fast else []), "--output-dir", str(self.out), *args]
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                              env={**self.environ, **(env or {})})
        written = [p.read_text(errors="replace") for p in (self.out / "metadata.json", self.out / "ATTRIBUTION.txt")
                   if p.exists()]
        assert_no_secrets(self.fake, proc.stdout, proc.stderr, *written)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def login(self) -> dict:
        """Seed a valid token, as a previous `--login` would have left it."""
        token = self.fake.issue_token()
        SEEN_SECRETS.update((token["access_token"], token["refresh_token"]))
        self.state.mkdir(mode=0o700, exist_ok=True)
        stored = {**token, "expires_at": time.time() + token["expires_in"], "client_id": CLIENT_ID}
        (self.state / "token.json").write_text(json.dumps(stored))
        return stored

    def metadata(self) -> list[dict]:
        return json.loads((self.out / "metadata.json").read_text())

    def ledger(self) -> list[dict]:
        path = self.state / "ledger.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def audio_files(self) -> list[str]:
        skip = {"metadata.json", "ATTRIBUTION.txt", "failed_ids.txt", "excluded_ids.txt"}
        if not self.out.exists():
            return []
        return sorted(p.name for p in self.out.iterdir()
                      if p.name not in skip and not p.name.startswith(".") and not p.name.endswith(".json"))


@pytest.fixture
def fake():
    server = FakeFreesound(make_sounds(12)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def env(fake, tmp_path) -> Env:
    return Env(fake, tmp_path)


@pytest.fixture
def run_main(env, monkeypatch, capsys):
    """main(argv) in this process, in the env's world: for what needs no process of its own
    (usage errors), at a fraction of a subprocess's start-up."""
    import download_freesound_library as dl

    for key in ("FREESOUND_API_URL", "FREESOUND_CLIENT_ID", "FREESOUND_CLIENT_SECRET", "FREESOUND_STATE_DIR"):
        monkeypatch.setenv(key, env.environ[key])

    def run(*args: str) -> Result:
        code = dl.main([*FAST, "--output-dir", str(env.out), *args])
        out, err = capsys.readouterr()
        assert_no_secrets(env.fake, out, err)
        return Result(int(code), out, err)
    return run
