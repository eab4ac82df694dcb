"""Which folders training may take: absent, empty, or a run folder of ours (rundir.py)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from magseg_hpc.errors import MagsegError
from magseg_hpc.rundir import (
    RUN_MARKER,
    SubmissionRecord,
    check_claimable,
    claim,
    is_run_folder,
)


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
    if name == "submission.json":  # the launcher's record names the folder it makes ours
        claim(tmp_path, submission=SubmissionRecord("0" * 32, "1"))
    else:
        (tmp_path / name).write_bytes(b"")
    assert is_run_folder(tmp_path)
    check_claimable(tmp_path)


def _users_folder(path):
    (path / "splits").mkdir(parents=True)
    for name, text in (("config.yaml", "my: settings\n"), ("metrics.jsonl", "{}\n"),
                       ("splits/labeled.txt", "7\n")):
        (path / name).write_text(text)
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_a_marker_copied_from_another_run_claims_nothing(tmp_path):
    """The marker names its folder (path and a token made there): copied into a user's
    folder beside the user's config.yaml, metrics.jsonl and splits, it proves nothing, and
    the folder is refused untouched; a marker naming no folder (older or hand-made) neither."""
    claim(tmp_path / "run")
    record = json.loads((tmp_path / "run" / RUN_MARKER).read_text())
    assert record["path"] == str(tmp_path / "run") and len(record["token"]) == 32
    mine = tmp_path / "mine"
    files = _users_folder(mine)
    shutil.copy(tmp_path / "run" / RUN_MARKER, mine / RUN_MARKER)
    assert not is_run_folder(mine)
    with pytest.raises(MagsegError, match=rf"not a magseg-hpc run folder .*; its {RUN_MARKER} "
                       rf"was made for {re.escape(str(tmp_path))}/run, not this folder"):
        check_claimable(mine)
    (mine / RUN_MARKER).write_text('{"kind": "magseg-hpc training run", "host": "h"}\n')
    with pytest.raises(MagsegError, match=f"its {RUN_MARKER} names no folder"):
        check_claimable(mine)
    (mine / RUN_MARKER).unlink()
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == files
    # the folder named through a link is the folder; claiming again keeps the token
    (tmp_path / "link").symlink_to(tmp_path / "run")
    assert is_run_folder(tmp_path / "link")
    claim(tmp_path / "run")
    assert json.loads((tmp_path / "run" / RUN_MARKER).read_text())["token"] == record["token"]


def test_a_moved_run_with_a_checkpoint_stays_ours_and_is_claimed_anew(tmp_path):
    claim(tmp_path / "run")
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "run").rename(tmp_path / "moved")
    assert is_run_folder(tmp_path / "moved")  # a checkpoint, as runs before the marker
    claim(tmp_path / "moved")
    assert json.loads((tmp_path / "moved" / RUN_MARKER).read_text())["path"] == str(
        tmp_path / "moved")


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
