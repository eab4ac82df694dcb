"""Which folders training may take: absent, empty, or a run folder of ours (rundir.py)."""

from __future__ import annotations

import json

import pytest

from magseg_hpc.errors import MagsegError
from magseg_hpc.rundir import RUN_MARKER, check_claimable, claim, is_run_folder


def test_absent_empty_and_claimed_folders_are_taken(tmp_path):
    check_claimable(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_claimable(tmp_path / "empty")
    claim(tmp_path / "new")
    assert json.loads((tmp_path / "new" / RUN_MARKER).read_text())["kind"].startswith("magseg")
    (tmp_path / "new" / "config.yaml").write_text("name: x\n")
    check_claimable(tmp_path / "new")  # resumable: ours


@pytest.mark.parametrize("name", ["checkpoint.pt", "best.pt", "submission.json"])
def test_folders_of_older_versions_and_of_the_launcher_are_ours(tmp_path, name):
    (tmp_path / "config.yaml").write_text("name: x\n")
    (tmp_path / name).write_bytes(b"")
    assert is_run_folder(tmp_path)
    check_claimable(tmp_path)


def test_a_users_folder_is_refused_untouched(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "config.yaml").write_text("mine\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(MagsegError, match=r"not a magseg-hpc run folder \(it holds config.yaml, "
                                          r"notes.txt, splits\)"):
        check_claimable(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "notes.txt", "splits"]
    (tmp_path / "f").write_text("")
    with pytest.raises(MagsegError, match="is a regular file; give a folder path"):
        check_claimable(tmp_path / "f")
