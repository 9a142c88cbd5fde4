"""Promises about the code itself: the single file stays readable, the project stands on
its own, and the three places that pin the dependencies agree."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib

from conftest import ROOT, SCRIPT

MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 200


def _definitions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, (node.end_lineno or node.lineno) - node.lineno + 1


def test_no_function_over_60_lines_and_no_class_over_200():
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    too_long = [f"{node.name}: {lines} lines" for node, lines in _definitions(tree)
                if lines > (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES)]
    assert too_long == []


OUTSIDE = "../" + "shared"  # the team's notes beside the repository; spelt in two parts so this file is no match


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    offenders = [name for name in tracked.split()
                 if OUTSIDE in (ROOT / name).read_text(encoding="utf-8", errors="replace")]
    assert offenders == []


def _pins(lines) -> list[str]:
    """`name==version` from requirement lines, or from the script's `#     "name==version",`."""
    found = (re.match(r'[#\s]*"?([a-z][a-z0-9-]*==[^",\s]+)', line) for line in lines)
    return sorted(match.group(1) for match in found if match)


def test_the_three_dependency_lists_agree():
    script_header = SCRIPT.read_text(encoding="utf-8").split("# ///")[1].splitlines()
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert _pins(script_header) == _pins(requirements) == sorted(project)
    assert not any(pin.startswith("freesound-python") for pin in project)  # a dependency-confusion name


def test_the_script_runs_as_a_command():
    assert SCRIPT.stat().st_mode & 0o111, "download_freesound_library.py is not executable"
    assert SCRIPT.read_text().startswith("#!/usr/bin/env -S uv run --script\n")  # uv reads the PEP 723 header
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["download-freesound-library"]
    module, _, function = entry.partition(":")
    result = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {function}; "
                             f"sys.exit({function}(['--version']))"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "0.1.0" in result.stdout, result.stderr
