"""One writer per output, and --overwrite that replaces a result only once the new one is
complete: a kill at any moment keeps the old result byte for byte (magseg_hpc/staging.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL
from segment_utils import is_complete, make_checkpoint, make_volume, write_input

from magseg_hpc.errors import MagsegError
from magseg_hpc.segment.resume import DoneMarkers
from magseg_hpc.staging import (
    begin_staging,
    is_staging,
    promote,
    recover,
    staging_path,
    writer_lock,
)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def make_result(path: Path, text: str) -> Path:
    (path / "data").mkdir(parents=True)
    (path / "data" / "c0").write_text(text)
    return path


@pytest.mark.parametrize("killed_after", ["nothing", "old moved aside", "new moved in"])
def test_a_swap_killed_at_any_step_is_finished_by_recover(tmp_path, killed_after):
    target = make_result(tmp_path / "out.zarr", "old")
    staging = begin_staging(target)
    make_result(staging, "new")
    old = tmp_path / ".out.zarr.magseg-old"
    if killed_after in ("old moved aside", "new moved in"):  # promote's steps, one by one
        os.rename(target, old)
    if killed_after == "new moved in":
        os.rename(staging, target)
    recover(target)
    expected = "old" if killed_after == "nothing" else "new"
    assert (target / "data" / "c0").read_text() == expected
    assert not old.exists()
    assert is_staging(staging) == (killed_after == "nothing")  # an unswapped staging stays
    if staging.exists():
        promote(staging, target)
    assert (target / "data" / "c0").read_text() == "new" and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_a_leftover_staging_is_cleared_only_when_it_is_ours(tmp_path):
    target = tmp_path / "out.zarr"
    foreign = staging_path(target).parent
    make_result(foreign, "someone's")
    with pytest.raises(MagsegError, match="not a magseg-hpc staging folder"):
        begin_staging(target)
    assert (foreign / "data" / "c0").read_text() == "someone's"
    shutil.rmtree(foreign)
    # Ours from its creation: whatever a kill left inside, half written, is cleared
    staging = begin_staging(target)
    make_result(staging, "half")
    assert begin_staging(target) == staging and not staging.exists()
    # ... and so is a leftover whose deletion a kill interrupted (renamed aside first)
    make_result(staging, "half")
    os.rename(staging.parent, tmp_path / ".out.zarr.magseg-trash")
    recover(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


HOLD = """
import sys, time
from magseg_hpc.staging import writer_lock
with writer_lock(sys.argv[1], "magseg-hpc segment-volume in.zarr out.zarr"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_one_writer_at_a_time_and_a_killed_holder_leaves_no_lock(tmp_path):
    target = tmp_path / "out.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MagsegError) as refused:
            with writer_lock(target):
                pytest.fail("a second writer got the lock")
        msg = str(refused.value)
        assert f"pid {holder.pid} on " in msg and "segment-volume in.zarr out.zarr" in msg
        assert "\n" not in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with writer_lock(target):  # the kernel dropped the dead holder's lock
        assert (tmp_path / ".out.zarr.magseg-lock").is_file()
    assert not (tmp_path / ".out.zarr.magseg-lock").exists()  # removed as it lets go


def test_lock_path_that_is_not_our_lock_file_is_refused_and_left_alone(tmp_path):
    """The lock is created with O_EXCL and opened with O_NOFOLLOW: a symbolic link there to
    a user's file, a folder or a user's file under the lock's name is refused in one line,
    and what is there stays byte-identical; a stale lock of a killed holder is reused."""
    target = tmp_path / "out.zarr"
    lock = tmp_path / ".out.zarr.magseg-lock"
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("years of work\n")
    for make, what in ((lambda: lock.symlink_to(thesis), "a symbolic link"),
                       (lock.mkdir, "a folder"),
                       (lambda: lock.write_text("my notes\n"), "a file not written by")):
        make()
        with pytest.raises(MagsegError, match=f"magseg-lock \\(the writer lock of .*out.zarr\\) "
                           f"is {what}") as refused:
            with writer_lock(target):
                pytest.fail("locked through something that is not a lock file")
        assert "\n" not in str(refused.value)
        assert thesis.read_text() == "years of work\n"
        assert lock.is_symlink() or lock.is_dir() or lock.read_text() == "my notes\n"
        lock.rmdir() if lock.is_dir() and not lock.is_symlink() else lock.unlink()
    lock.write_text('{"host": "h", "pid": 1, "started": "-", "command": "x"}')  # stale
    with writer_lock(target):
        assert '"pid"' in lock.read_text()
    assert not lock.exists()


def test_killed_overwrite_keeps_the_old_result_and_resume_completes_it(tmp_path,
                                                                       tmp_path_factory,
                                                                       command_server):
    """A second --overwrite while one runs is refused; a SIGKILL half-way through leaves the
    previous result byte-identical; --resume continues the staged run to the same bytes as
    an uninterrupted one, and swaps it in."""
    volume = make_volume((16, 96, 96), seed=3)  # 8 slabs of 2 x 96 x 96 with TTA
    inp = write_input(tmp_path / "in.zarr", volume, (16, 32, 32))
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out, ref = tmp_path / "out.zarr", tmp_path / "ref.zarr"
    logs = tmp_path_factory.mktemp("logs")
    base = ["segment-volume", str(inp)]
    slow = ["--model", str(ckpt), "--slab-size", "2", "--tta", "--probabilities",
            "--in-process", "--workers", "1", "--threads-per-worker", "1",
            "--dashboard-address", ":0"]

    def run(name: str, *argv: str) -> tuple[int, str]:
        """(exit status, stdout and stderr) of a command run to its end."""
        code = command_server.run([*base, *argv], logs / name)
        return code, (logs / name).read_text()

    code, text = run("first", str(out), "--method", "threshold", "--dashboard-address", ":0")
    assert code == 0, text
    before = snapshot(out)

    pid = command_server.start([*base, str(out), "--overwrite", *slow], logs / "killed")
    try:
        markers = DoneMarkers(staging_path(out))
        deadline = time.monotonic() + 120
        while len(markers.done()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        # frozen half-way, holding the output: the run is still going, whatever the time the
        # second writer takes
        os.killpg(pid, signal.SIGSTOP)
        assert 2 <= len(markers.done()) < 8, (logs / "killed").read_text()
        code, text = run("second", str(out), "--overwrite", *slow)
        lines = [line for line in text.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, text
        assert "being written by another run" in lines[0]
        assert f"pid {pid} on " in lines[0]
    finally:
        command_server.kill(pid)  # SIGKILL, stopped or not
    assert snapshot(out) == before  # the old result, byte for byte
    assert is_staging(staging_path(out)) and 2 <= len(markers.done()) < 8

    code, text = run("resumed", str(out), "--resume", *slow)
    assert code == 0, text
    assert "swapped in when complete" in text and "already done" in text
    assert not staging_path(out).exists() and is_complete(out)
    code, text = run("reference", str(ref), *slow)
    assert code == 0, text
    import zarr

    a, b = zarr.open_group(str(out)), zarr.open_group(str(ref))
    np.testing.assert_array_equal(a["labels"][:], b["labels"][:])
    np.testing.assert_array_equal(a["probabilities"][:], b["probabilities"][:])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_random_kills_of_ingest_overwrite_never_damage_the_old_result(tmp_path,
                                                                      tmp_path_factory,
                                                                      command_server):
    """20 SIGKILLs at random moments of `ingest --overwrite`: the output is always the old
    result or the new one, byte for byte, never a mixture; a rerun then completes to the
    same bytes as an uninterrupted run and leaves nothing beside it. (Each run a forked
    process of the command server: the moments fall in the command's work, not in
    Python's start-up.)"""
    import random

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", rng.random((24, 64, 64), dtype=np.float32))
    out, ref = tmp_path / "out.zarr", tmp_path / "ref.zarr"
    log = tmp_path_factory.mktemp("logs") / "ingest.log"

    def ingest(src: str, dest: Path, *flags: str) -> int:
        return command_server.start(["ingest", str(tmp_path / f"{src}.npy"), str(dest),
                                     "--chunks", "2,64,64", *flags], log)

    assert command_server.wait(ingest("a", out)) == 0, log.read_text()
    started = time.monotonic()
    assert command_server.wait(ingest("b", ref)) == 0, log.read_text()
    one_run = time.monotonic() - started
    old, new = snapshot(out), snapshot(ref)
    assert old != new
    moments = random.Random(0)
    outcomes = []
    for _ in range(20):
        pid = ingest("b", out, "--overwrite")
        time.sleep(moments.uniform(0.0, one_run))
        command_server.kill(pid)
        got = snapshot(out)
        assert got in (old, new), "the output is neither the old nor the new result"
        outcomes.append("new" if got == new else "mid-write" if staging_path(out).parent.exists()
                        else "old")
        if got == new:  # back to the old result for the next trial
            assert command_server.wait(ingest("a", out, "--overwrite")) == 0, log.read_text()
    assert command_server.wait(ingest("b", out, "--overwrite")) == 0, log.read_text()
    assert snapshot(out) == new  # the rerun completes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy", "out.zarr",
                                                          "ref.zarr"]
    assert "mid-write" in outcomes, outcomes  # some kills landed while the new one was written


def test_random_kills_of_segment_volume_overwrite_never_damage_the_old_result(
        tmp_path, tmp_path_factory, command_server):
    """10 SIGKILLs at random moments of `segment-volume --overwrite` over a complete result:
    the output is always the old result byte for byte, or the complete new one; a rerun then
    completes to the labels of an uninterrupted run and leaves nothing beside it. (Each run a
    forked process of the command server: the moments fall in the command's work, not in
    Python's start-up.)"""
    import random

    import zarr

    inp = write_input(tmp_path / "in.zarr", make_volume((24, 96, 96), seed=4), (4, 96, 96))
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out, ref = tmp_path / "out.zarr", tmp_path / "ref.zarr"
    log = tmp_path_factory.mktemp("logs") / "segment.log"

    def segment(dest: Path, *flags: str, model: bool = True) -> int:
        how = ["--model", str(ckpt), "--slab-size", "2"] if model else ["--method", "threshold"]
        return command_server.start(["segment-volume", str(inp), str(dest),
                                     "--dashboard-address", ":0", *how, *flags], log)

    assert command_server.wait(segment(out, model=False)) == 0, log.read_text()
    started = time.monotonic()
    assert command_server.wait(segment(ref)) == 0, log.read_text()
    one_run = time.monotonic() - started
    old, new_labels = snapshot(out), zarr.open_group(str(ref))["labels"][:]

    def is_new() -> bool:
        return is_complete(out) and np.array_equal(zarr.open_group(str(out))["labels"][:],
                                                   new_labels)

    moments = random.Random(0)
    outcomes = []
    for _ in range(10):
        pid = segment(out, "--overwrite")
        time.sleep(moments.uniform(0.0, one_run))
        command_server.kill(pid)
        if snapshot(out) == old:
            outcomes.append("mid-write" if staging_path(out).parent.exists() else "old")
        else:
            assert is_new(), "the output is neither the old nor the new result"
            outcomes.append("new")
            # the old one back
            assert command_server.wait(segment(out, "--overwrite", model=False)) == 0, \
                log.read_text()
            old = snapshot(out)  # the same labels, a new time stamp
    assert command_server.wait(segment(out, "--overwrite")) == 0, log.read_text()
    assert is_new()  # the rerun completes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "in.zarr", "out.zarr",
                                                          "ref.zarr"]
    assert "mid-write" in outcomes, outcomes  # some kills landed while the new one was written


def test_atomic_write_leaves_the_old_file_or_the_new_one_and_its_leftovers_are_removed(
        tmp_path):
    """The one temp-and-rename: a failed write keeps the old file and leaves no temp file;
    the temp files a kill leaves (and those of earlier versions) are removed by the next
    run of those files, and nothing else (another file's, a user's)."""
    from magseg_hpc.paths import atomic_write, remove_temp_files

    path = tmp_path / "summary.json"
    atomic_write(path, "old\n")

    def half_then_fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "summary.json"]
    killed = [".summary.json.0a1b2c.magseg-tmp", ".checkpoint.pt.k2j3l1x.tmp",
              ".config.yaml.tmp", ".curves.png.tmp.png"]
    kept = [".report.json.0a1b2c.magseg-tmp", "notes.tmp", ".mine.tmp", "summary.json"]
    for name in killed + kept[:3]:
        (tmp_path / name).write_text("x")
    removed = remove_temp_files(tmp_path, ["summary.json", "checkpoint.pt", "config.yaml",
                                           "curves.png"])
    assert sorted(p.name for p in removed) == sorted(killed)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def _tiny_config(volume: Path, **train) -> dict:
    return {"name": "tiny", "seed": 0, "model": TINY_MODEL,
            "data": {"volume": str(volume), "n_labeled": 3, "n_val": 2},
            "train": {"batch_size": 2, "crop_size": 32, "epochs": 1, "max_iters": 2,
                      "checkpoint_every": 1, "eval_every": 1, "log_every": 1, "lr": 0.01,
                      "device": "cpu", "threads": 1, **train}}


# A second process imports everything, then starts the command at the test's signal.
AT_ONCE = """
import sys, time
from pathlib import Path
import magseg_hpc.commands.train, magseg_hpc.train.loop
from magseg_hpc.cli import main
print("ready", flush=True)
while not Path(sys.argv[1]).exists():
    time.sleep(0.001)
sys.exit(main(sys.argv[2:]))
"""


def test_two_trainings_started_at_once_into_one_folder_one_proceeds(tmp_path):
    """Training holds its run folder's writer lock: of two identical trainings started at
    the same moment (one in another process, one in this) exactly one proceeds, the other
    is refused in one line naming it; every record is written once. The one that proceeds
    removes what a killed run's atomic writes left in the folder."""
    import contextlib
    import io
    import json

    import yaml

    from magseg_hpc.cli import main
    from magseg_hpc.data.phantom import make_phantom, write_phantom
    from magseg_hpc.rundir import claim

    write_phantom(tmp_path / "ph.zarr", make_phantom((8, 32, 32), seed=0, n_angles=20))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(tmp_path / "ph.zarr")))
    run = tmp_path / "run"
    claim(run)  # a run folder of ours, with a killed run's temp files
    stale = [run / ".checkpoint.pt.k2j3l1x.tmp", run / ".best.pt.0a1b2c.magseg-tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    go, argv = tmp_path / "go", ["train", "--config", str(config), "--output-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-c", AT_ONCE, str(go), *argv], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "ready"
    here = io.StringIO()
    go.touch()
    with contextlib.redirect_stderr(here), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    there = proc.communicate(timeout=300)[1]
    assert sorted([code, proc.returncode]) == [0, 2], (here.getvalue(), there)
    loser, winner = (here.getvalue(), proc.pid) if code == 2 else (there, os.getpid())
    lines = [line for line in loser.splitlines() if line.strip()]
    assert len(lines) == 1, loser
    assert "is being written by another run" in lines[0] and f"pid {winner} on " in lines[0]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["iteration"], "teacher_miou" in r) for r in records]
    assert len(keys) == len(set(keys)) >= 2  # each step and evaluation once
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "ph.zarr", "run", "tiny.yaml"]


class Killed(BaseException):
    """A kill at one moment: no clean-up of ours runs (only the lock's, as the kernel's)."""


@pytest.mark.parametrize("moment", ["store made, not yet ours", "no run record yet",
                                    "before the rename"])
def test_a_kill_while_segment_volume_creates_its_output_leaves_nothing_to_disown(
        tmp_path, monkeypatch, moment):
    """The new store is made in staging, with its run record, and renamed into place: a kill
    just after zarr made the store (not yet marked as ours), before its run record or before
    the rename leaves nothing at the output, and the same command completes."""
    from magseg_hpc.cli import main
    from magseg_hpc.segment import pipeline
    from magseg_hpc.volume import store

    def killed(*args, **kwargs):
        raise Killed

    module, name = {"store made, not yet ours": (store, "record_owner"),
                    "no run record yet": (pipeline, "write_run_record"),
                    "before the rename": (pipeline, "promote")}[moment]
    inp = write_input(tmp_path / "in.zarr", make_volume((8, 32, 32), seed=2), (4, 32, 32))
    out = tmp_path / "out.zarr"
    argv = ["segment-volume", str(inp), str(out), "--method", "threshold",
            "--dashboard-address", ":0"]
    monkeypatch.setattr(module, name, killed)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.undo()
    assert not out.exists() and is_staging(staging_path(out))
    assert main(argv) == 0  # the same command: no manual step
    assert is_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "out.zarr"]


@pytest.mark.slow
def test_random_kills_of_the_demo_never_lose_the_previous_demo(tmp_path, command_server):
    """6 SIGKILLs at random moments of `demo --overwrite` over a finished demo: the folder
    is always the previous demo byte for byte, or a complete new one; a rerun completes
    and leaves nothing beside it. (Each run a forked process of the command server: no
    start-up of seconds per trial.)"""
    import json
    import random

    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(tmp_path / "set-by-the-demo.zarr",
                                                  max_iters=1)))
    out = tmp_path / "demo"

    def demo(*flags: str) -> int:  # the pid of a demo run
        return command_server.start(["demo", str(out), "--config", str(config), "--iters",
                                     "1", "--shape", "8,32,32", *flags])

    def complete() -> bool:
        owner = json.loads((out / ".magseg" / "owner.json").read_text())
        return owner["format"] == "magseg-hpc/demo/1" and all(
            (out / name).exists() for name in owner["entries"])

    started = time.monotonic()
    assert command_server.wait(demo()) == 0
    one_run = time.monotonic() - started
    old = snapshot(out)
    moments = random.Random(0)
    outcomes = []
    for _ in range(6):
        pid = demo("--overwrite")
        time.sleep(moments.uniform(0.0, one_run))
        command_server.kill(pid)
        got = snapshot(out)
        if got == old:
            outcomes.append("mid-write" if staging_path(out).parent.exists() else "old")
        else:
            assert complete(), "the demo folder is neither the previous demo nor a new one"
            outcomes.append("new")
            old = got
    assert command_server.wait(demo("--overwrite")) == 0  # the rerun completes
    assert complete() and snapshot(out) != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "tiny.yaml"]
    assert "mid-write" in outcomes, outcomes  # some kills landed while the new one was made
