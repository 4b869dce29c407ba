"""scripts/setup.sh keeps the moshi test oracle out of the user's environment and says what
it is doing; the tests find the oracle in its own folder."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.fixtures import oracle

ROOT = Path(__file__).resolve().parent.parent
SETUP = (ROOT / "scripts" / "setup.sh").read_text()


def test_moshi_is_installed_into_its_own_folder_only():
    installs = [line for line in SETUP.splitlines() if re.search(r"pip.* install .*moshi", line) or
                ("$PIP install" in line and "moshi" in line)]
    assert installs, "setup.sh no longer installs the oracle"
    assert all("--target .oracle" in line and "--no-deps" in line for line in installs), installs
    assert "uninstall -y -q moshi" in SETUP  # an older setup's copy leaves .venv


def test_the_oracle_folder_goes_on_sys_path_after_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / ".oracle"
    oracle.add_oracle_to_path(folder)
    assert str(folder) not in sys.path  # absent: nothing added
    folder.mkdir()
    oracle.add_oracle_to_path(folder)
    oracle.add_oracle_to_path(folder)
    assert sys.path.count(str(folder)) == 1 and sys.path[-1] == str(folder)
    assert oracle.ORACLE_DIR == ROOT / ".oracle"


def test_setup_says_what_it_is_doing_at_each_step():
    # Each long step announces itself, and pip's own progress is not silenced for them.
    assert len(re.findall(r'^\s*step \d', SETUP, re.M)) >= 4
    for line in SETUP.splitlines():
        if "$PIP install" in line and ("torch" in line or "-e " in line):
            assert " -q " not in line and "--progress-bar on" in line, line
