"""segment-volume against in-memory oracles, on odd shapes and chunkings (thread workers)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster
from segment_utils import (
    is_complete,
    make_checkpoint,
    make_volume,
    quantize,
    read_labels,
    reference_fusion,
    reference_probabilities,
    write_input,
)

from magseg_hpc.errors import MagsegError
from magseg_hpc.launch.dask_cluster import local_cluster_size, slurm_cluster_kwargs
from magseg_hpc.segment.blocks import aligned_slab_size, output_chunks, plan_axis, plan_passes
from magseg_hpc.segment.pipeline import SegmentOptions, segment_volume
from magseg_hpc.segment.resume import DoneMarkers

SHAPE = (13, 37, 29)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg")
    volume = make_volume(SHAPE)
    ckpt = make_checkpoint(d / "ckpt.pt")
    ref = reference_probabilities(ckpt, volume)
    return {"dir": d, "volume": volume, "ckpt": ckpt, "ref": ref,
            "input": write_input(d / "in.zarr", volume, (4, 16, 16))}


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


def run(work, client, out, **kw):
    kw.setdefault("normalization", "checkpoint")  # what the oracle applies
    opts = SegmentOptions(input=str(kw.pop("input", work["input"])), output=str(out),
                          model=str(work["ckpt"]), **kw)
    return segment_volume(opts, client, progress=False)


# --- pure parts -------------------------------------------------------------------------------

def test_slab_plan_is_chunk_aligned_and_covers_every_slice():
    slabs = plan_axis("z", "z", 13, chunk=4, slab_size=5)  # 5 rounds up to 8
    assert [(s.start, s.stop) for s in slabs] == [(0, 8), (8, 13)]
    assert aligned_slab_size(5, 4) == 8 and aligned_slab_size(8, 4) == 8
    chunks = output_chunks(SHAPE, ("y",), 6)
    assert chunks == (13, 6, 29)
    plan = plan_passes(SHAPE, ("z", "y", "x"), {"z": 3, "y": 3, "x": 3}, 3, 3)
    for axis, n in zip("zyx", SHAPE, strict=True):
        covered = [i for s in plan if s.stage == axis for i in range(s.start, s.stop)]
        assert covered == list(range(n))
    assert [s.stage for s in plan].count("fuse") == 5


def test_local_cluster_size_uses_cores_and_gpus():
    assert local_cluster_size(16, 0, None, None) == (4, 4)
    assert local_cluster_size(2, 0, None, None) == (1, 2)
    assert local_cluster_size(8, 0, 2, None) == (2, 4)
    assert local_cluster_size(16, 4, None, None) == (4, 4)  # one worker per GPU


def test_slurm_kwargs_from_job_profile():
    kw = slurm_cluster_kwargs({"partition": "debug", "gpus_per_node": 2, "cpus_per_task": 3,
                               "mem_gb": 8, "timeout_min": 90, "qos": "normal",
                               "sbatch_extra": {"exclusive": True}, "setup": ["# x", "ml cuda"]},
                              "127.0.0.1:0")
    assert kw["queue"] == "debug" and kw["processes"] == 2 and kw["cores"] == 6
    assert kw["memory"] == "8GB" and kw["walltime"] == "01:30:00"
    assert "--gres=gpu:2" in kw["job_extra_directives"]
    assert "--exclusive" in kw["job_extra_directives"]
    assert kw["worker_extra_args"] == ["--resources", "GPU=1"]
    assert kw["job_script_prologue"] == ["ml cuda"]


# --- against the oracle ---------------------------------------------------------------------

@pytest.mark.parametrize("chunks, slab, batch", [((4, 16, 16), 5, 3), ((5, 7, 3), 2, 8),
                                                  ((13, 37, 29), 4, 1)])
def test_labels_equal_slice_by_slice_reference(work, client, tmp_path, chunks, slab, batch):
    inp = write_input(tmp_path / "in.zarr", work["volume"], chunks)
    out = tmp_path / "out.zarr"
    summary = run(work, client, out, input=inp, slab_size=slab, batch_size=batch,
                  probabilities=True)
    labels = read_labels(out)
    expected = work["ref"].argmax(0)
    assert len(np.unique(expected)) > 1  # the oracle is not trivially constant
    np.testing.assert_array_equal(labels, expected)
    probs = np.asarray(zarr.open_group(str(out))["probabilities"][:])
    assert np.abs(probs.astype(int) - quantize(work["ref"])).max() <= 1
    assert is_complete(out)
    assert summary.voxels == np.prod(SHAPE) and summary.slices == SHAPE[0]
    assert sum(w["slabs"] for w in summary.per_worker.values()) == summary.slabs_run
    # The output is a regular xarray dataset with the input's coordinates.
    import xarray as xr

    ds = xr.open_zarr(str(out))
    assert ds["labels"].dims == ("z", "y", "x") and ds.sizes["y"] == SHAPE[1]


def test_orthoplane_equals_reference_fusion(work, client, tmp_path):
    out = tmp_path / "out.zarr"
    run(work, client, out, axes=("z", "y", "x"), slab_size=5, probabilities=True)
    labels, mean = reference_fusion(work["ckpt"], work["volume"])
    got = read_labels(out)
    np.testing.assert_array_equal(got, labels)
    probs = np.asarray(zarr.open_group(str(out))["probabilities"][:])
    assert np.abs(probs.astype(int) - mean).max() <= 1
    assert not (out / ".magseg" / "scratch.zarr").exists()  # scratch removed when complete
    assert is_complete(out)


def test_single_y_pass_writes_y_slabs_directly(work, client, tmp_path):
    out = tmp_path / "out.zarr"
    run(work, client, out, axes=("y",), slab_size=10)
    assert tuple(zarr.open_group(str(out))["labels"].chunks) == (13, 10, 29)
    ref = reference_probabilities(work["ckpt"], work["volume"], axis="y")
    np.testing.assert_array_equal(read_labels(out), ref.argmax(0))


def test_tta_equals_reference_flips(work, client, tmp_path):
    out = tmp_path / "out.zarr"
    run(work, client, out, tta=True, slab_size=8, batch_size=4)
    ref = reference_probabilities(work["ckpt"], work["volume"], tta=True)
    np.testing.assert_array_equal(read_labels(out), ref.argmax(0))


def test_resume_rewrites_unfinished_slabs_and_refuses_other_settings(work, client, tmp_path):
    out = tmp_path / "out.zarr"
    run(work, client, out, slab_size=4)
    expected = read_labels(out)
    # Simulate a run killed after two slabs: markers gone, their chunks wiped.
    markers = DoneMarkers(out)
    lost = sorted(markers.done())[2:]
    markers.unmark(lost)
    arr = zarr.open_group(str(out), mode="r+")["labels"]
    arr[8:] = 0
    summary = run(work, client, out, slab_size=4, resume=True, batch_size=2)
    assert summary.slabs_run == len(lost) and summary.slabs_skipped == 2
    np.testing.assert_array_equal(read_labels(out), expected)
    with pytest.raises(MagsegError, match="other settings.*tta"):
        run(work, client, out, slab_size=4, resume=True, tta=True)
    with pytest.raises(MagsegError, match="slab_size"):
        run(work, client, out, slab_size=8, resume=True)
    with pytest.raises(MagsegError, match="already exists"):
        run(work, client, out, slab_size=4)
    other = make_checkpoint(tmp_path / "other.pt", seed=5)
    with pytest.raises(MagsegError, match="model_sha256"):
        segment_volume(SegmentOptions(str(work["input"]), str(out), model=str(other),
                                      slab_size=4, resume=True), client, progress=False)
    np.testing.assert_array_equal(read_labels(out), expected)  # refusals clobber nothing


def test_threshold_method_equals_whole_volume_threshold(work, client, tmp_path):
    from magseg_hpc.segment.threshold import fit_threshold_params, threshold_segment_volume

    volume = np.abs(work["volume"])
    volume[:, :4] = 0  # a background border for the support threshold
    inp = write_input(tmp_path / "in.zarr", volume, (4, 16, 16))
    out = tmp_path / "out.zarr"
    segment_volume(SegmentOptions(str(inp), str(out), method="threshold", slab_size=4),
                   client, progress=False)
    params = fit_threshold_params(volume)
    np.testing.assert_array_equal(read_labels(out), threshold_segment_volume(volume,
                                                                             params=params))


def test_nan_slab_fails_by_name_and_output_stays_incomplete(work, client, tmp_path,
                                                            monkeypatch):
    from magseg_hpc.segment import pipeline

    monkeypatch.setattr(pipeline, "PRECHECK_BYTES", 0)  # as for a volume too big to scan
    volume = work["volume"].copy()
    volume[5, 3, 3] = np.nan  # slice 5 is not in the pre-check sample (0, 4, 8, 12)
    inp = write_input(tmp_path / "in.zarr", volume, (4, 16, 16))
    out = tmp_path / "out.zarr"
    with pytest.raises(MagsegError, match=r"1 of 4 slabs failed \(z\[4:8\]\).*NaN.*"
                       r"details in .*failures\.log"):
        run(work, client, out, input=inp, slab_size=4)
    assert not is_complete(out)
    details = (out / ".magseg" / "failures.log").read_text()  # the traceback, for the curious
    assert details.count("slab z[4:8]: MagsegError") == 1 and "File " in details
    assert len(DoneMarkers(out).done()) == 3


def test_the_scheduler_knows_every_slab_of_the_run_from_the_start(work, client, tmp_path):
    """The dashboard's progress is the job's: at the first finished slab the scheduler holds
    every pass and fusion slab, all in one task group named by number and plane."""
    from collections import Counter

    seen = []

    def snapshot(stats):
        if not seen:
            seen.append(client.run_on_scheduler(
                lambda dask_scheduler: sorted(str(k) for k in dask_scheduler.tasks)))

    out = tmp_path / "out.zarr"
    opts = SegmentOptions(input=str(work["input"]), output=str(out), model=str(work["ckpt"]),
                          axes=("z", "y", "x"), slab_size=5, normalization="checkpoint")
    summary = segment_volume(opts, client, progress=False, on_result=snapshot)
    runs = Counter(k.rsplit("-", 1)[1] for k in seen[0] if k.startswith("segment-slab-"))
    token = runs.most_common(1)[0][0]  # (an earlier test's failed run may linger)
    slabs = [k for k in seen[0] if k.startswith("segment-slab-") and k.endswith(token)]
    assert len(slabs) == summary.slabs_total  # finished ones are still held by their futures
    stages = {k.split("-")[3] for k in slabs}
    assert stages == {"z", "y", "x", "fuse"}
    assert sorted(int(k.split("-")[2]) for k in slabs) == list(range(summary.slabs_total))
    from distributed.utils import key_split

    assert {key_split(k) for k in slabs} == {"segment-slab"}  # one progress bar on the dashboard
    np.testing.assert_array_equal(read_labels(out), reference_fusion(work["ckpt"],
                                                                     work["volume"])[0])


def test_a_failed_pass_cancels_the_fusion_and_counts_once(work, client, tmp_path, monkeypatch):
    from magseg_hpc.segment import pipeline

    monkeypatch.setattr(pipeline, "PRECHECK_BYTES", 0)
    volume = work["volume"].copy()
    volume[5, 3, 3] = np.nan
    inp = write_input(tmp_path / "in.zarr", volume, (4, 16, 16))
    out = tmp_path / "out.zarr"
    with pytest.raises(MagsegError, match=r"\d of \d+ slabs failed \([zyx]\[") as err:
        run(work, client, out, input=inp, axes=("z", "y", "x"), slab_size=5)
    assert "fuse" not in str(err.value)
    assert not any(k.startswith("fuse") for k in DoneMarkers(out).done())
    assert not is_complete(out)
