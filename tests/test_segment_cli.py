"""segment-volume through the CLI: bad inputs, a killed run resumed, the dashboard serving."""

from __future__ import annotations

import shlex
import socket
import time
import urllib.request

import numpy as np
import pytest
import torch
import zarr
from distributed import Client, LocalCluster
from segment_utils import is_complete, make_checkpoint, make_volume, read_labels, write_input

from magseg_hpc.classes import ClassTable
from magseg_hpc.cli import main
from magseg_hpc.segment.pipeline import SegmentOptions, segment_volume
from magseg_hpc.segment.resume import DoneMarkers


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    volume = make_volume((9, 21, 17))
    nan = volume.copy()
    nan[0, 2, 2] = np.inf
    (d / "notes.txt").write_text("not a volume")
    ckpt = make_checkpoint(d / "ckpt.pt")
    data = ckpt.read_bytes()
    (d / "corrupt.pt").write_bytes(data[: len(data) // 2])  # truncated by a crashed copy
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")
    other = ClassTable(("background", "domain"), ((0, 0, 0), (255, 0, 0)))
    return {
        "dir": d, "input": write_input(d / "in.zarr", volume, (4, 8, 8)),
        "nan": write_input(d / "nan.zarr", nan, (4, 8, 8)),
        "ckpt": ckpt,
        "other_classes": make_checkpoint(d / "other.pt", class_table=other),
    }


def cli(capsys, *args) -> tuple[int, str]:
    rc = main(["segment-volume", *map(str, args)])
    return rc, capsys.readouterr().err.strip()


BAD = {
    "missing input": (["{d}/nope.zarr"], "no such file"),
    "not a volume": (["{d}/notes.txt"], "not a volume format"),
    "missing checkpoint": (["{input}", "--model", "{d}/none.pt"], "checkpoint not found"),
    "corrupt checkpoint": (["{input}", "--model", "{d}/corrupt.pt"],
                           "cannot read checkpoint .*truncated"),
    "foreign checkpoint": (["{input}", "--model", "{d}/foreign.pt"], "not a magseg-hpc"),
    "unknown variable": (["{input}", "--var", "raw"], "no variable 'raw'; it has .*image"),
    "inf voxels": (["{nan}"], "NaN or inf voxels"),
    "unknown axis": (["{input}", "--axes", "z,w"], "unknown axis 'w'"),
    "threshold with tta": (["{input}", "--method", "threshold", "--tta"], "labels only"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_nothing_clobbered(files, capsys, tmp_path, case):
    args, message = BAD[case]
    out = tmp_path / "out.zarr"
    out.mkdir()
    # a store of ours (so --overwrite gets past the output check to the bad input)
    (out / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": '
                                   '{"magseg_hpc": {"format": "magseg-hpc/labels/1"}}}')
    (out / ".magseg").mkdir()
    (out / ".magseg" / "owner.json").write_text(
        '{"format": "magseg-hpc/labels/1", "entries": ["precious"]}')
    (out / "precious").write_text("keep me")
    fmt = {"d": files["dir"], "input": files["input"], "nan": files["nan"]}
    args = [a.format(**fmt) for a in args]
    if "--model" not in args:
        args += ["--model", str(files["ckpt"])]
    rc, err = cli(capsys, args[0], out, *args[1:], "--overwrite", "--in-process",
                  "--dashboard-address", ":0")
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith("magseg-hpc: error:")
    import re

    assert re.search(message, err), err
    assert (out / "precious").read_text() == "keep me"


def test_unreachable_scheduler(files, capsys, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    rc, err = cli(capsys, files["input"], tmp_path / "out.zarr", "--model", files["ckpt"],
                  "--scheduler", f"tcp://127.0.0.1:{port}")
    assert rc == 2 and "cannot reach the Dask scheduler" in err
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "out.zarr").exists()


def test_resume_with_checkpoint_for_other_classes_is_refused(files, capsys, tmp_path):
    out = tmp_path / "out.zarr"
    common = ["--in-process", "--dashboard-address", ":0", "--slab-size", "4"]
    rc, _ = cli(capsys, files["input"], out, "--model", files["ckpt"], *common)
    assert rc == 0 and is_complete(out)
    before = read_labels(out)
    rc, err = cli(capsys, files["input"], out, "--model", files["other_classes"], "--resume",
                  *common)
    assert rc == 2 and "class_table" in err
    np.testing.assert_array_equal(read_labels(out), before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_run_resumes_to_identical_output_and_dashboard_serves(files, tmp_path,
                                                                      command_server):
    """A run killed as a session (the command and its worker process) after two slabs,
    its dashboard answering while it ran, is refused without --resume and resumed with it
    to the bytes of an uninterrupted run. (Each run forked from the command server.)"""
    volume = make_volume((40, 64, 64), seed=3)
    inp = write_input(tmp_path / "in.zarr", volume, (16, 32, 32))
    out, ref_out = tmp_path / "out.zarr", tmp_path / "ref.zarr"
    port = free_port()
    args = ["segment-volume", str(inp), str(out),
            "--model", str(files["ckpt"]), "--slab-size", "2", "--tta", "--probabilities",
            "--workers", "1", "--threads-per-worker", "1"]
    log = tmp_path / "killed.log"
    pid = command_server.start(args + ["--dashboard-address", f"127.0.0.1:{port}"], log)
    try:
        status = None
        deadline = time.monotonic() + 120
        while status != 200 and time.monotonic() < deadline and command_server.running(pid):
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/status",
                                                timeout=2).status
            except OSError:
                time.sleep(0.2)
        assert status == 200, "dashboard did not answer during the run"
        markers = DoneMarkers(out)
        while (len(markers.done()) < 2 and time.monotonic() < deadline
               and command_server.running(pid)):
            time.sleep(0.02)
        assert command_server.running(pid), log.read_text()
    finally:
        command_server.kill(pid)  # its session: the command with its worker
    done_at_kill = len(DoneMarkers(out).done())
    assert 2 <= done_at_kill < 20 and not is_complete(out)
    # Without --resume an existing output is refused; with it, the run finishes.
    refused = command_server.completed(args + ["--dashboard-address", ":0"])
    assert refused.returncode == 2 and "--resume" in refused.stderr
    with socket.socket() as busy:  # the asked port is taken: another one, and why, is said
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        resumed = command_server.completed(args + ["--resume", "--dashboard-address",
                                                   f"127.0.0.1:{taken}"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"dashboard port {taken} on 127.0.0.1 is taken" in resumed.stderr
    assert f"dashboard: http://127.0.0.1:{taken}/" not in resumed.stdout
    assert f"{done_at_kill} already done" in resumed.stdout
    assert "voxels/s" in resumed.stdout and "dashboard: http://127.0.0.1:" in resumed.stdout
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        segment_volume(SegmentOptions(str(inp), str(ref_out), model=str(files["ckpt"]),
                                      slab_size=2, tta=True, probabilities=True,
                                      torch_threads=1),  # bit-identical needs equal threads
                       client, progress=False)
    import zarr

    a, b = zarr.open_group(str(out)), zarr.open_group(str(ref_out))
    assert is_complete(out)
    np.testing.assert_array_equal(a["labels"][:], b["labels"][:])
    np.testing.assert_array_equal(a["probabilities"][:], b["probabilities"][:])


def test_a_small_volume_runs_its_one_worker_in_this_process(files, capsys, tmp_path):
    """No worker process for a volume that fits one worker; --workers 1 still starts one."""
    rc = main(["segment-volume", str(files["input"]), str(tmp_path / "a.zarr"), "--model",
               str(files["ckpt"]), "--dashboard-address", ":0"])
    out = capsys.readouterr().out
    assert rc == 0 and "one worker in this process" in out
    rc = main(["segment-volume", str(files["input"]), str(tmp_path / "b.zarr"), "--model",
               str(files["ckpt"]), "--dashboard-address", ":0", "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "one worker in this process" not in out
    np.testing.assert_array_equal(read_labels(tmp_path / "a.zarr"),
                                  read_labels(tmp_path / "b.zarr"))
    # the provenance records the command as run (main's argv, not this process's sys.argv)
    recorded = zarr.open_group(str(tmp_path / "b.zarr"), mode="r").attrs["provenance"]
    assert recorded["command_line"] == shlex.join(
        ["magseg-hpc", "segment-volume", str(files["input"]), str(tmp_path / "b.zarr"),
         "--model", str(files["ckpt"]), "--dashboard-address", ":0", "--workers", "1"])


def test_a_failed_slab_is_one_line_in_the_terminal(files, capsys, tmp_path, monkeypatch):
    """A slab that fails in a worker: one line on stderr naming it and the log with its
    traceback; the worker's own traceback goes to OUT/.magseg/cluster.log."""
    from magseg_hpc.segment import pipeline

    monkeypatch.setattr(pipeline, "PRECHECK_BYTES", 0)  # as for a volume too big to scan
    volume = make_volume((13, 37, 29), seed=1)
    volume[5, 3, 3] = np.nan  # not among the pre-checked slices (0, 4, 8, 12)
    inp = write_input(tmp_path / "in.zarr", volume, (4, 16, 16))
    out = tmp_path / "out.zarr"
    capsys.readouterr()
    rc = main(["segment-volume", str(inp), str(out), "--model", str(files["ckpt"]),
               "--slab-size", "4", "--dashboard-address", ":0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0, err
    assert "1 of 4 slabs failed (z[4:8])" in err and "failures.log" in err
    assert "Compute Failed" in (out / ".magseg" / "cluster.log").read_text()
