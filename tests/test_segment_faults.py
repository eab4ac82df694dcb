"""A Dask worker process killed mid-run: its slabs rerun elsewhere, the output is unchanged."""

from __future__ import annotations

import os
import signal

import numpy as np
from distributed import Client, LocalCluster
from segment_utils import (
    is_complete,
    make_checkpoint,
    make_volume,
    read_labels,
    reference_probabilities,
    write_input,
)

from magseg_hpc.segment.pipeline import SegmentOptions, segment_volume


def test_killed_worker_reruns_its_slabs_and_output_is_unchanged(tmp_path):
    volume = make_volume((13, 37, 29))
    inp = write_input(tmp_path / "in.zarr", volume, (4, 16, 16))
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    killed = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)  # worker address -> pid

        def kill_other_worker(stats: dict) -> None:
            if killed:
                return
            # Kill the worker that did NOT just finish: it is busy with its next slab.
            for addr, pid in pids.items():
                info = client.scheduler_info()["workers"].get(addr, {})
                if str(info.get("name")) != stats["worker"]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return

        summary = segment_volume(
            SegmentOptions(str(inp), str(tmp_path / "out.zarr"), model=str(ckpt), slab_size=1,
                           torch_threads=1, normalization="checkpoint"),  # as the oracle
            client, progress=False, on_result=kill_other_worker,
        )
        new_pids = set(client.run(os.getpid).values())
    assert killed and killed[0] not in new_pids  # a worker really died (the nanny restarted it)
    assert summary.slabs_run == 13 and not summary.failed
    expected = reference_probabilities(ckpt, volume).argmax(0)
    np.testing.assert_array_equal(read_labels(tmp_path / "out.zarr"), expected)
    assert is_complete(tmp_path / "out.zarr")


def test_input_deleted_during_a_run_fails_instead_of_reading_zeros(tmp_path):
    """zarr reads a store that vanished under an open array as its fill value: the slab
    task checks the input still exists after reading, so nothing is written as background."""
    import shutil

    import pytest

    from magseg_hpc.errors import MagsegError
    from magseg_hpc.segment.pipeline import prepare
    from magseg_hpc.segment.worker import get_volume, run_slab

    inp = write_input(tmp_path / "in.zarr", make_volume((6, 20, 24)), (2, 20, 24))
    prep = prepare(SegmentOptions(str(inp), str(tmp_path / "out.zarr"), method="threshold"))
    get_volume(prep.job.input, prep.job.var)  # opened, as a worker has it mid-run
    shutil.rmtree(inp)
    with pytest.raises(MagsegError, match="the input vanished during the run"):
        run_slab(prep.job, prep.slabs[0])
    assert not (tmp_path / "out.zarr").exists()
