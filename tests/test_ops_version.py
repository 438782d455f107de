"""``dit-lifecycle --version`` and ``python -m lifecycle --version`` print the installed
distribution's version (read back from the installed metadata), in a real interpreter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_python_m_lifecycle_version_prints_the_installed_version():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lifecycle", "--version"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"dit-lifecycle {version('dit-lifecycle')}\n"
    assert "torch" not in done.stderr


def test_main_version_returns_zero_and_ignores_the_missing_command(capsys):
    from lifecycle._cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dit-lifecycle {version('dit-lifecycle')}"
    assert main(["--version", "demo", "--bogus"]) == 0  # argparse answers --version first


@pytest.mark.skipif(shutil.which("dit-lifecycle") is None, reason="the console script is not installed")
def test_the_console_script_prints_it_too():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["dit-lifecycle", "--version"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["dit-lifecycle", version("dit-lifecycle")]
