"""Bad input, table-driven: every command, careful and hostile users (issue #10).

Each case runs ``magseg-hpc ARGS`` (or ``python -m magseg_hpc.submit ARGS``) in-process in a
folder of prepared inputs, and checks that it exits 2 with exactly one line on stderr that
names the problem (no traceback), and that every file in the folder is byte-identical
afterwards with nothing added (no staging leftovers, no half-written outputs, no empty job
folders). A few cases run as real subprocesses too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
SHAPE = (8, 32, 32)
COLORS = {"background": [149, 0, 255], "domain_minus": [30, 0, 255], "domain_plus": [255, 0, 0]}


def _tiny_config(volume: str, **train) -> dict:
    return {
        "name": "tiny", "seed": 0, "model": TINY_MODEL,
        "data": {"volume": volume, "n_labeled": 3, "n_val": 2},
        "train": {"batch_size": 2, "crop_size": 32, "epochs": 1, "max_iters": 1,
                  "checkpoint_every": 1, "eval_every": 1, "log_every": 1, "lr": 0.01,
                  "ema_decay": 0.99, "device": "cpu", "threads": 1, **train},
    }


def _label_store(path: Path, *, complete: bool = True, shape=SHAPE, names=None) -> None:
    import dask.array as da
    import xarray as xr

    from magseg_hpc.classes import ClassTable
    from magseg_hpc.volume.store import create_label_store, set_complete, write_label_region

    table = ClassTable.default() if names is None else ClassTable.from_dict(
        {"names": names, "colors": [[0, 0, 0], [1, 1, 1], [2, 2, 2]]})
    like = xr.DataArray(da.zeros(shape, dtype=np.uint8), dims=("z", "y", "x"))
    create_label_store(path, like=like, class_table=table, provenance={"test": True})
    labels = np.random.default_rng(0).integers(0, 3, size=shape).astype(np.uint8)
    write_label_region(path, (slice(None),) * 3, labels)
    set_complete(path, complete)


def _corrupt_a_chunk(store: Path, var: str) -> None:
    chunk = sorted(p for p in (store / var / "c").rglob("*") if p.is_file())[0]
    chunk.write_bytes(b"this is not a zstd frame")


def _immutable(path: Path, on: bool) -> bool:
    """A folder no one can write to, root included (chattr +i), or chmod for other users."""
    if os.geteuid() != 0:
        path.chmod(0o555 if on else 0o755)
        return True
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The prepared inputs (built once): volumes good and bad, stores, configs, checkpoints."""
    import tifffile
    import torch
    import zarr
    from PIL import Image

    from magseg_hpc.config import config_from_dict
    from magseg_hpc.data.phantom import make_phantom, write_phantom
    from magseg_hpc.models.checkpoint import load_checkpoint, save_checkpoint
    from magseg_hpc.train import run_training

    w = tmp_path_factory.mktemp("bad_inputs")
    write_phantom(w / "ph.zarr", make_phantom(SHAPE, seed=0, n_angles=20))
    rng = np.random.default_rng(0)
    good = rng.random(SHAPE, dtype=np.float32)
    np.save(w / "good.npy", good)
    nan = good.copy()
    nan[3, 4, 5] = np.nan
    np.save(w / "nan.npy", nan)
    inf = good.copy()
    inf[1, 2, 3] = np.inf
    np.save(w / "inf.npy", inf)
    (w / "zero.npy").write_bytes(b"")
    np.save(w / "empty1d.npy", np.zeros((0,), np.float32))
    np.save(w / "empty3.npy", np.zeros((0, 32, 32), np.float32))
    (w / "corrupt.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"garbage" * 5)
    np.save(w / "2d.npy", good[0])
    np.save(w / "4d.npy", np.zeros((2, 2, 8, 8), np.float32))
    np.save(w / "complex.npy", good.astype(np.complex64))
    np.save(w / "bool.npy", good > 0.5)
    np.save(w / "str.npy", np.full(SHAPE, "a"))
    (w / "notes.txt").write_text("not a volume\n")
    u8 = (good * 255).astype(np.uint8)
    tifffile.imwrite(w / "t.tif", u8)
    data = (w / "t.tif").read_bytes()
    (w / "trunc.tif").write_bytes(data[: len(data) // 2])
    frames = [Image.fromarray(f) for f in u8]
    frames[0].save(w / "g.gif", save_all=True, append_images=frames[1:])
    data = (w / "g.gif").read_bytes()
    (w / "trunc.gif").write_bytes(data[: len(data) // 2])
    (w / "fake.gif").write_text("GIF89a but not really")
    (w / "fake.h5").write_text("not hdf5")
    import h5py

    with h5py.File(w / "two.h5", "w") as f:
        f["a"] = good
        f["b"] = good
    (w / "emptydir").mkdir()
    (w / "mixed").mkdir()
    Image.fromarray(u8[0]).save(w / "mixed" / "a.png")
    Image.fromarray(u8[0, :16]).save(w / "mixed" / "b.png")
    # slice folders: a damaged slice in the middle, macOS's hidden files only, a folder and a
    # looping link named like slices
    for name in ("pngtrunc", "pnggarbage", "pngsub", "pngloop", "onlyhidden"):
        (w / name).mkdir()
        for z in range(4 if name != "onlyhidden" else 0):
            Image.fromarray(u8[z]).save(w / name / f"z{z:03d}.png")
    data = (w / "pngtrunc" / "z002.png").read_bytes()
    (w / "pngtrunc" / "z002.png").write_bytes(data[: len(data) // 3])
    (w / "pnggarbage" / "z002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 9)
    (w / "pngsub" / "sub.png").mkdir()
    (w / "pngloop" / "loop.png").symlink_to("loop.png")
    (w / "onlyhidden" / "._z000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (w / "onlyhidden" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    np.save(w / "f128.npy", good.astype(np.longdouble))
    # stores: a corrupt chunk, broken metadata, another program's zarr, a tool label store
    shutil.copytree(w / "ph.zarr", w / "cor.zarr")
    _corrupt_a_chunk(w / "cor.zarr", "image")
    shutil.copytree(w / "ph.zarr", w / "zloop.zarr")  # a chunk file that links to itself
    chunk = sorted(p for p in (w / "zloop.zarr" / "image" / "c").rglob("*") if p.is_file())[0]
    chunk.unlink()
    chunk.symlink_to(chunk.name)
    from magseg_hpc.volume.ingest import ingest

    ingest(w / "good.npy", w / "lost.zarr", chunks=(4, 16, 16))  # 8 chunks, one file lost
    (w / "lost.zarr" / "image" / "c" / "1" / "0" / "1").unlink()
    (w / "broken.zarr").mkdir()
    (w / "broken.zarr" / "zarr.json").write_text("{ not json")
    foreign = zarr.open_group(str(w / "foreign.zarr"), mode="w", zarr_format=3)
    foreign.create_array("a", shape=SHAPE, dtype="float32")[:] = good
    foreign.create_array("b", shape=SHAPE, dtype="float32")[:] = good
    _label_store(w / "lab.zarr")
    _label_store(w / "incomplete.zarr", complete=False)
    _label_store(w / "narrow.zarr", shape=(8, 32, 16))
    _label_store(w / "othercls.zarr", names=["outside", "up", "down"])
    shutil.copytree(w / "lab.zarr", w / "corlab.zarr")
    _corrupt_a_chunk(w / "corlab.zarr", "labels")
    shutil.copytree(w / "ph.zarr", w / "outer.zarr")  # a tool store with an input inside
    np.save(w / "outer.zarr" / "inner.npy", good)
    # things a user owns
    (w / "d").mkdir()
    (w / "d" / "thesis.txt").write_text("years of work\n")
    (w / "file.txt").write_text("keep me\n")
    (w / "rep.json").write_text('{"mine": true}\n')
    (w / "link.zarr").symlink_to(w / "ph.zarr")
    # the writer-lock names of two outputs: a link to a user's file, a folder
    (w / ".lsym.zarr.magseg-lock").symlink_to(w / "file.txt")
    (w / ".ldir.zarr.magseg-lock").mkdir()
    # colour masks
    (w / "masks").mkdir()
    palette = np.array(list(COLORS.values()), dtype=np.uint8)
    for z in range(3):
        Image.fromarray(palette[rng.integers(0, 3, (32, 32))]).save(w / "masks" / f"m{z}.png")
    (w / "notpng").mkdir()
    (w / "notpng" / "m0.png").write_text("not a png")
    (w / "wrongmasks").mkdir()  # painted with a colour of no class
    for z in range(2):
        Image.fromarray(np.full((32, 32, 3), [10, 200, 10], np.uint8)).save(
            w / "wrongmasks" / f"m{z}.png")
    np.save(w / "nines.npy", np.full(SHAPE, 9, np.uint8))  # labels of no class value
    shutil.copytree(w / "ph.zarr", w / "ph7.zarr")  # a label 7 on z slice 2 (3 classes)
    labels = zarr.open_group(str(w / "ph7.zarr"), mode="r+")["labels"]
    labels[2, 3, 3] = 7
    (w / "colors.yaml").write_text(yaml.safe_dump(COLORS))
    (w / "colors_bad.yaml").write_text("background: [1, 2]\n")
    (w / "colors_tag.yaml").write_text("!!python/object/apply:os.system ['echo hi']\n")
    # slice lists: the axis line in upper case (x, not the default z) and one naming no axis
    (w / "upper_axis.txt").write_text("# axis: X\n1\n3\n")
    (w / "no_axis.txt").write_text("# axis: w\n1\n3\n")
    # configs
    tiny = _tiny_config(str(w / "ph.zarr"))
    (w / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    (w / "empty.yaml").write_text("")
    (w / "comments.yaml").write_text("# nothing here yet\n")
    (w / "braces.yaml").write_text("{}\n")
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):  # 9**9 strings once expanded
        bomb.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    (w / "bomb.yaml").write_text("\n".join(bomb) + "\nname: *i\n")
    (w / "pytag.yaml").write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "unknown.yaml").write_text(yaml.safe_dump({**tiny, "trian": {}}))
    (w / "dupkey.yaml").write_text(yaml.safe_dump(tiny) + "seed: 3\n")  # seed given twice
    for name, entry in (("big", "100"), ("neg", "-1"), ("abc", "abc")):  # 8 slices along z
        (w / f"split_{name}.txt").write_text(f"# labelled\n1\n{entry}\n")
    (w / "badtype.yaml").write_text(yaml.safe_dump({**tiny, "seed": "zero"}))
    (w / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (w / "novolume.yaml").write_text(yaml.safe_dump(
        {**tiny, "data": {**tiny["data"], "volume": str(w / "missing.zarr")}}))
    (w / "badjob.yaml").write_text("partition: [1, 2\n")
    (w / "bombjob.yaml").write_text("\n".join(bomb) + "\npartition: *i\n")
    (w / "unknownjob.yaml").write_text("partitoin: gpu\n")
    (w / "dupjob.yaml").write_text("partition: gpu\npartition: cpu\n")
    # a user's folder with the names a run writes: training must not take it
    (w / "mine" / "splits").mkdir(parents=True)
    (w / "mine" / "config.yaml").write_text("my: settings\n")
    (w / "mine" / "metrics.jsonl").write_text("{}\n")
    (w / "mine" / "splits" / "val.txt").write_text("7\n")
    (w / "demo_like" / "train").mkdir(parents=True)  # a user's folder with a demo's names
    (w / "demo_like" / "train" / "notes.txt").write_text("mine\n")
    # a checkpoint trained for one iteration, and damaged variants
    run_training(config_from_dict(tiny), w / "run")
    (w / "run" / "checkpoint.pt").unlink()  # best.pt (no optimizer state) is enough here
    # a user's folder with the run's marker copied in: the marker names the run, not it
    shutil.copytree(w / "mine", w / "mine_marked")
    (w / "mine_marked" / "splits" / "labeled.txt").write_text("1\n2\n")
    shutil.copy(w / "run" / ".magseg-run.json", w / "mine_marked")
    shutil.copy(w / "run" / "best.pt", w / "ck.pt")
    ck = load_checkpoint(w / "ck.pt")
    bad = {**ck, "teacher": {k: (v.clone().fill_(float("nan")) if v.is_floating_point() else v)
                             for k, v in ck["teacher"].items()}}
    save_checkpoint(w / "nan_ck.pt", bad)
    save_checkpoint(w / "nan_norm_ck.pt", {**ck, "normalization": {
        **ck["normalization"], "std": float("nan")}})
    save_checkpoint(w / "zero_std_ck.pt", {**ck, "normalization": {
        **ck["normalization"], "std": 0.0}})
    data = (w / "ck.pt").read_bytes()
    (w / "trunc_ck.pt").write_bytes(data[: len(data) // 3])
    torch.save({"conv.weight": torch.zeros(2, 2)}, w / "plain.pt")
    torch.save({"x": argparse.Namespace(a=1)}, w / "pickle.pt")
    (w / "text.pt").write_text("not torch\n")
    (w / "ro").mkdir()
    ro = _immutable(w / "ro", True)
    yield {"path": w, "read_only": ro}
    if ro:
        _immutable(w / "ro", False)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root: sha256 for files (size and modification time for
    files over 4 MiB), 'dir' / 'link' otherwise."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.stat().st_size > 2**22:  # checkpoints: size and time, hashing is slow
                out[rel] = f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of the magseg-hpc command line ``argv``, run in this process."""
    from magseg_hpc import cli, submit

    entry = submit.main if argv[:1] == ["submit"] else cli.main
    args = argv[1:] if argv[:1] == ["submit"] else argv
    err = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = [logging.StreamHandler(err)]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                code = entry(args)
            except SystemExit as e:
                code = e.code
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])
    return code, err.getvalue()


def C(cid: str, command: str, pattern: str, *, forbid: str | None = None, marks=()):
    """One case: id, the command line (after ``magseg-hpc``), a regex the error must match,
    and text it must not contain (e.g. a suggestion of --overwrite for a foreign folder)."""
    return pytest.param(shlex.split(command), pattern, forbid, id=cid, marks=marks)


NOT_OURS = r"not written by magseg-hpc|regular file|symbolic link"
no_gpu = pytest.mark.skipif(
    "torch" in sys.modules and sys.modules["torch"].cuda.is_available(), reason="has a GPU")
# Cases about a machine without SLURM run with sbatch and srun hidden from PATH (CI has SLURM)
no_sbatch = pytest.mark.without_slurm
long_double = pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8,
                                 reason="long double is float64 here")
LONG = "n" * 300  # longer than any file system's name limit (255 bytes)

INGEST = [
    C("missing-src", "ingest nope.npy o.zarr", "no such file"),
    C("unknown-format", "ingest notes.txt o.zarr", "not a volume format"),
    C("zero-byte-npy", "ingest zero.npy o.zarr", r"not a readable \.npy"),
    C("empty-1d-npy", "ingest empty1d.npy o.zarr", "expected a 3D volume"),
    C("empty-3d-npy", "ingest empty3.npy o.zarr", "volume is empty"),
    C("corrupt-npy-header", "ingest corrupt.npy o.zarr", r"not a readable \.npy"),
    C("2d", "ingest 2d.npy o.zarr", "expected a 3D volume"),
    C("4d", "ingest 4d.npy o.zarr", "expected a 3D volume"),
    C("complex", "ingest complex.npy o.zarr", "not supported"),
    C("bool", "ingest bool.npy o.zarr", "not supported"),
    C("strings", "ingest str.npy o.zarr", "not a number"),
    C("nan-voxels", "ingest nan.npy o.zarr", r"1 NaN/inf voxels .*z,y,x=\(3, 4, 5\)"),
    C("inf-voxels", "ingest inf.npy o.zarr", "NaN/inf voxels"),
    C("truncated-tiff", "ingest trunc.tif o.zarr", "not a readable TIFF"),
    C("truncated-gif", "ingest trunc.gif o.zarr", "not a readable image"),
    C("fake-gif", "ingest fake.gif o.zarr", "not a readable image"),
    C("fake-h5", "ingest fake.h5 o.zarr", "not a readable HDF5"),
    C("h5-two-datasets", "ingest two.h5 o.zarr", "choose the dataset"),
    C("h5-missing-dataset", "ingest two.h5:/nope o.zarr", "no dataset 'nope'"),
    C("empty-folder", "ingest emptydir o.zarr", "no .tif or .png slices"),
    C("slices-of-two-sizes", "ingest mixed o.zarr", "same size"),
    C("corrupt-zarr-chunk", "ingest cor.zarr o.zarr", "cannot read its voxels"),
    C("broken-zarr-metadata", "ingest broken.zarr o.zarr", "not a readable zarr store"),
    C("zarr-missing-var", "ingest ph.zarr o.zarr --var nope", "no variable 'nope'"),
    C("zarr-two-vars", "ingest foreign.zarr o.zarr", "choose the variable"),
    C("fill-nan", "ingest nan.npy o.zarr --fill-nonfinite nan", "must be a finite number"),
    C("fill-inf", "ingest nan.npy o.zarr --fill-nonfinite inf", "must be a finite number"),
    C("fill-minus-inf", "ingest nan.npy o.zarr --fill-nonfinite=-inf", "finite number"),
    C("fill-beyond-dtype", "ingest nan.npy o.zarr --fill-nonfinite 1e39",
      "--fill-nonfinite 1e[+]39: not a finite float32"),
    C("fill-not-a-number", "ingest nan.npy o.zarr --fill-nonfinite x", "invalid float"),
    C("chunks-zero", "ingest good.npy o.zarr --chunks 0,1,1", "three positive integers"),
    C("chunks-two", "ingest good.npy o.zarr --chunks 1,2", "three positive integers"),
    C("chunks-text", "ingest good.npy o.zarr --chunks a,b,c", "three positive integers"),
    C("codec-unknown", "ingest good.npy o.zarr --codec lzma9", "invalid choice"),
    C("no-output-arg", "ingest good.npy", "required"),
    C("existing-store", "ingest good.npy ph.zarr", "already exists; pass --overwrite"),
    C("overwrite-plain-folder", "ingest good.npy d --overwrite", NOT_OURS, forbid="--overwrite"),
    C("plain-folder", "ingest good.npy d", NOT_OURS, forbid="--overwrite"),
    C("overwrite-regular-file", "ingest good.npy file.txt --overwrite", "regular file",
      forbid="--overwrite"),
    C("overwrite-foreign-zarr", "ingest good.npy foreign.zarr --overwrite",
      "zarr store not written by magseg-hpc", forbid="--overwrite"),
    C("overwrite-symlink", "ingest good.npy link.zarr --overwrite", "symbolic link|is the input"),
    C("overwrite-label-store", "ingest good.npy lab.zarr --overwrite",
      "is a magseg-hpc label store, and this command writes image stores"),
    C("output-is-input", "ingest ph.zarr ph.zarr --var image --overwrite", "is the input"),
    C("output-is-input-no-flag", "ingest ph.zarr ph.zarr", "is the input"),
    C("output-inside-input", "ingest ph.zarr ph.zarr/sub.zarr", "inside the input"),
    C("input-inside-output", "ingest outer.zarr/inner.npy outer.zarr --overwrite",
      "lies inside the output"),
    C("output-under-a-file", "ingest good.npy file.txt/o.zarr", "is a file, not a folder"),
    C("output-read-only", "ingest good.npy ro/o.zarr", "not writable"),
    C("lock-is-a-symlink", "ingest good.npy lsym.zarr",
      r"lsym.zarr.magseg-lock \(the writer lock of \S*lsym.zarr\) is a symbolic link"),
    C("lock-is-a-folder", "ingest good.npy ldir.zarr", r"ldir.zarr.magseg-lock .* is a folder"),
    C("png-slice-truncated", "ingest pngtrunc o.zarr",
      r"pngtrunc/z002\.png: cannot read its voxels"),
    C("png-slice-garbage", "ingest pnggarbage o.zarr",
      r"pnggarbage/z002\.png: not a readable slice image"),
    C("png-only-hidden-files", "ingest onlyhidden o.zarr", r"no \.tif or \.png slices"),
    C("png-subfolder", "ingest pngsub o.zarr", r"sub\.png: is not a regular file"),
    C("png-symlink-loop", "ingest pngloop o.zarr",
      r"loop\.png: cannot open it \(Too many levels of symbolic links\)"),
    C("zarr-symlink-loop", "ingest zloop.zarr o.zarr",
      r"image/c/0/0/0 \(a broken or looping link\)"),
    C("float128", "ingest f128.npy o.zarr", "float128 voxels are not supported",
      marks=long_double),
    C("output-name-too-long", f"ingest good.npy {LONG}.zarr",
      "longer than this file system allows"),
    C("output-name-no-room-beside", f"ingest good.npy {LONG[:245]}.zarr",
      r"longer than this file system allows \(\d+ bytes, \d+ for the output's own name\)"),
    C("zarr-lost-chunk", "ingest lost.zarr o.zarr",
      r"1 of 8 chunks .*image/c/1/0/1.* --absent-chunks-are-fill"),
    C("input-name-too-long", f"ingest {LONG}.npy o.zarr", "File name too long; the name is "
      "longer than the file system allows"),
]

INFO = [
    C("missing", "info nope.zarr", "no such file"),
    C("unknown-format", "info notes.txt", "not a volume format"),
    C("zero-byte-npy", "info zero.npy", r"not a readable \.npy"),
    C("empty-1d-npy", "info empty1d.npy", "expected a 3D volume"),
    C("corrupt-npy-header", "info corrupt.npy", r"not a readable \.npy"),
    C("2d", "info 2d.npy", "expected a 3D volume"),
    C("4d", "info 4d.npy", "expected a 3D volume"),
    C("complex", "info complex.npy", "not supported"),
    C("bool", "info bool.npy", "not supported"),
    C("truncated-tiff", "info trunc.tif", "not a readable TIFF"),
    C("truncated-gif", "info trunc.gif", "not a readable image"),
    C("fake-h5", "info fake.h5", "not a readable HDF5"),
    C("broken-zarr", "info broken.zarr", "not a readable zarr store"),
    C("missing-var", "info ph.zarr --var nope", "no variable 'nope'"),
    C("corrupt-label-chunk", "info corlab.zarr", "cannot read its voxels"),
    C("png-subfolder", "info pngsub", "is not a regular file"),
    C("float128", "info f128.npy", "voxels are not supported", marks=long_double),
    C("no-path", "info", "required"),
]

PHANTOM = [
    C("snr-zero", "make-phantom o.zarr --snr 0", r"--snr 0.0: must be > 0"),
    C("snr-negative", "make-phantom o.zarr --snr=-1", "must be > 0"),
    C("snr-nan", "make-phantom o.zarr --snr nan", "must be > 0"),
    C("snr-tiny", "make-phantom o.zarr --snr 1e-300", "snr 1e-300 is too small"),
    C("shape-huge", "make-phantom o.zarr --shape 100000,100000,100000",
      r"about [\d,.]+ GiB of memory"),
    C("shape-1024-cubed", "make-phantom o.zarr --shape 1024,1024,1024", r"GiB of memory"),
    C("shape-too-small", "make-phantom o.zarr --shape 2,32,32", "each >= 4"),
    C("shape-zero", "make-phantom o.zarr --shape 0,32,32", "three positive integers"),
    C("shape-two", "make-phantom o.zarr --shape 32,32", "three positive integers"),
    C("domain-period", "make-phantom o.zarr --domain-period 1", "domain_period must be"),
    C("anisotropy", "make-phantom o.zarr --anisotropy 0.5", "anisotropy must be"),
    C("wall-width", "make-phantom o.zarr --wall-width=-1", "wall_width must be"),
    C("blur-sigma", "make-phantom o.zarr --blur-sigma=-1", "blur_sigma must be"),
    C("n-angles", "make-phantom o.zarr --n-angles=-3", "n_angles must be"),
    C("missing-wedge", "make-phantom o.zarr --missing-wedge-deg 200", "missing_wedge_deg"),
    C("edge-glow", "make-phantom o.zarr --edge-glow=-1", "edge_glow must be"),
    C("swirl", "make-phantom o.zarr --swirl=-1", "swirl must be"),
    C("net-magnetization", "make-phantom o.zarr --net-magnetization 2", "net_magnetization"),
    C("minus-level", "make-phantom o.zarr --minus-level 1.5", "minus_level must be"),
    C("noise-correlation", "make-phantom o.zarr --noise-correlation=-1", "noise_correlation"),
    C("shading", "make-phantom o.zarr --shading 2", "shading must be"),
    C("tilt-nan", "make-phantom o.zarr --tilt-deg nan", "tilt_deg must be|tilt"),
    C("seed-negative", "make-phantom o.zarr --seed=-1", "seed must be"),
    C("support", "make-phantom o.zarr --support cube", "invalid choice"),
    C("pattern", "make-phantom o.zarr --pattern dots", "invalid choice"),
    C("existing-store", "make-phantom ph.zarr", "already exists; pass --overwrite"),
    C("overwrite-plain-folder", "make-phantom d --overwrite", NOT_OURS, forbid="--overwrite"),
    C("overwrite-regular-file", "make-phantom file.txt --overwrite", "regular file",
      forbid="--overwrite"),
    C("overwrite-foreign-zarr", "make-phantom foreign.zarr --overwrite", NOT_OURS,
      forbid="--overwrite"),
    C("overwrite-symlink", "make-phantom link.zarr --overwrite", "symbolic link"),
    C("output-under-a-file", "make-phantom file.txt/o.zarr", "is a file, not a folder"),
    C("output-read-only", "make-phantom ro/o.zarr --shape 8,32,32", "not writable"),
]

MASKS = [
    C("missing-dir", "import-masks nope o.zarr --colors colors.yaml", "no such folder"),
    C("dir-is-file", "import-masks file.txt o.zarr --colors colors.yaml",
      "not a folder|not a volume format"),
    C("no-pngs", "import-masks emptydir o.zarr --colors colors.yaml", "no .png masks"),
    C("sizes-differ", "import-masks mixed o.zarr --colors colors.yaml", "one size"),
    C("not-a-png", "import-masks notpng o.zarr --colors colors.yaml", "not a readable PNG"),
    C("png-subfolder", "import-masks pngsub o.zarr --colors colors.yaml",
      "is not a regular file"),
    C("png-symlink-loop", "import-masks pngloop o.zarr --colors colors.yaml", "cannot open it"),
    C("only-hidden-files", "import-masks onlyhidden o.zarr --colors colors.yaml",
      r"no \.png masks"),
    C("colors-missing", "import-masks masks o.zarr --colors nope.yaml", "colour file not found"),
    C("colors-bad", "import-masks masks o.zarr --colors colors_bad.yaml", r"colou?r"),
    C("colors-python-tag", "import-masks masks o.zarr --colors colors_tag.yaml",
      "not valid YAML or JSON"),
    C("colors-alias-bomb", "import-masks masks o.zarr --colors bomb.yaml", "aliases"),
    C("no-colors-flag", "import-masks masks o.zarr", "required|need --colors"),
    C("existing-store", "import-masks masks lab.zarr --colors colors.yaml",
      "already exists; pass --overwrite"),
    C("overwrite-plain-folder", "import-masks masks d --colors colors.yaml --overwrite",
      NOT_OURS, forbid="--overwrite"),
    C("overwrite-regular-file", "import-masks masks file.txt --colors colors.yaml --overwrite",
      "regular file", forbid="--overwrite"),
    C("output-is-input", "import-masks masks masks --colors colors.yaml --overwrite",
      "is the input"),
    C("output-inside-input", "import-masks masks masks/o.zarr --colors colors.yaml",
      "inside the input"),
    C("output-read-only", "import-masks masks ro/o.zarr --colors colors.yaml", "not writable"),
    C("no-colour-of-the-table", "import-masks wrongmasks o.zarr --colors colors.yaml",
      r"wrongmasks: no pixel of the masks has a colour of the class table .*they hold "
      r"\[10, 200, 10\] x2048; .*nothing was written"),
    C("sparse-no-colour-of-the-table", "import-masks wrongmasks o.zarr --colors colors.yaml "
      "--like ph.zarr", "no pixel of the masks has a colour of the class table"),
    C("label-array-no-class-value", "import-masks nines.npy o.zarr",
      r"nines.npy: no voxel holds a class value \(background 0, domain_minus 1, domain_plus 2\)"),
]

EXPORT = [
    C("suggestions-upper-case-axis", "export-slices ph.zarr ex --suggestions upper_axis.txt "
      "--axis z", "upper_axis.txt lists x slices but --axis is z"),
    C("suggestions-no-axis", "export-slices ph.zarr ex --suggestions no_axis.txt",
      r"no_axis.txt:1: '# axis: w' names no axis"),
]

PREVIEW = [
    C("missing", "preview nope.zarr -o p.png", "no such file"),
    C("not-png", "preview ph.zarr -o p.jpg", "must be a .png"),
    C("output-is-folder", "preview ph.zarr -o d", "folder|\\.png"),
    C("z-out-of-range", "preview ph.zarr --z 100 -o p.png", "100"),
    C("z-negative", "preview ph.zarr --z=-100 -o p.png", "-100"),
    C("two-axes", "preview ph.zarr --z 1 --y 1 -o p.png", "not allowed with"),
    C("alpha", "preview ph.zarr --alpha 2 -o p.png", r"--alpha 2.0: must be in \[0, 1\]"),
    C("labels-shape", "preview ph.zarr --labels narrow.zarr -o p.png", "shape"),
    C("labels-missing", "preview ph.zarr --labels nope.zarr -o p.png", "no such file"),
    C("inside-input", "preview ph.zarr -o ph.zarr/p.png", "inside the input"),
    C("corrupt-chunk", "preview cor.zarr -o p.png", "cannot read its voxels"),
    C("truncated-tiff", "preview trunc.tif -o p.png", "not a readable TIFF"),
    C("under-a-file", "preview ph.zarr -o file.txt/p.png", "is a file, not a folder"),
    C("read-only", "preview ph.zarr -o ro/p.png", "not writable"),
]

EVALUATE = [
    C("pred-missing", "evaluate nope.zarr ph.zarr", "no such file"),
    C("truth-missing", "evaluate lab.zarr nope.zarr", "no such file"),
    C("shapes-differ", "evaluate narrow.zarr ph.zarr", "shape"),
    C("class-tables-differ", "evaluate othercls.zarr ph.zarr", "class tables differ"),
    C("ignore-is-a-class", "evaluate lab.zarr ph.zarr --ignore 1", "is a class label"),
    C("ignore-text", "evaluate lab.zarr ph.zarr --ignore abc", "integer label or 'none'"),
    C("slices-without-figures", "evaluate lab.zarr ph.zarr --slices 1", "add --figures"),
    C("slices-out-of-range", "evaluate lab.zarr ph.zarr --figures figs --slices 100",
      "outside the volume"),
    C("slices-text", "evaluate lab.zarr ph.zarr --slices a", "slice indices"),
    C("report-is-folder", "evaluate lab.zarr ph.zarr --report d", "is a folder"),
    C("figures-is-file", "evaluate lab.zarr ph.zarr --figures file.txt", "give a folder path"),
    C("report-foreign-json", "evaluate lab.zarr ph.zarr --report rep.json",
      "not a magseg-hpc evaluation report"),
    C("report-inside-input", "evaluate lab.zarr ph.zarr --report lab.zarr/r.json",
      "inside the input"),
    C("figures-inside-input", "evaluate lab.zarr ph.zarr --figures ph.zarr/figs",
      "inside the input"),
    C("report-is-input", "evaluate lab.zarr ph.zarr --report ph.zarr", "is the input"),
    C("report-under-a-file", "evaluate lab.zarr ph.zarr --report file.txt/r.json",
      "is a file, not a folder"),
    C("report-read-only", "evaluate lab.zarr ph.zarr --report ro/r.json", "not writable"),
    C("incomplete-pred", "evaluate incomplete.zarr ph.zarr", "marked incomplete"),
    C("incomplete-truth", "evaluate lab.zarr incomplete.zarr", "marked incomplete"),
    C("float-pred", "evaluate ph.zarr ph.zarr --pred-var image", "not an integer label"),
    C("image-shape", "evaluate lab.zarr ph.zarr --figures figs --image narrow.zarr", "shape"),
    C("corrupt-pred-chunk", "evaluate corlab.zarr ph.zarr", "cannot read its voxels"),
    C("pred-not-volume", "evaluate notes.txt ph.zarr", "not a volume format"),
]

SEG = "segment-volume ph.zarr o.zarr"
THR = f"{SEG} --method threshold"
SEGMENT = [
    C("workers-negative", f"{THR} --workers=-2", r"--workers -2: must be a positive"),
    C("workers-zero", f"{THR} --workers 0", r"--workers 0: must be a positive"),
    C("threads-zero", f"{THR} --threads-per-worker 0", "--threads-per-worker 0"),
    C("threads-negative", f"{THR} --threads-per-worker=-1", "--threads-per-worker -1"),
    C("batch-zero", f"{THR} --batch-size 0", "--batch-size 0"),
    C("batch-negative", f"{THR} --batch-size=-3", "--batch-size -3"),
    C("slab-zero", f"{THR} --slab-size 0", "--slab-size 0"),
    C("jobs-zero", f"{THR} --jobs 0", "--jobs 0"),
    C("workers-text", f"{THR} --workers two", "invalid int"),
    C("dashboard-negative-port", f"{THR} --dashboard-address zzz:-5", "--dashboard-address"),
    C("dashboard-port-too-big", f"{THR} --dashboard-address 127.0.0.1:99999",
      "--dashboard-address"),
    C("dashboard-text-port", f"{THR} --dashboard-address host:http", "--dashboard-address"),
    C("dashboard-space", f"{THR} --dashboard-address 'a b:80'", "--dashboard-address"),
    C("axes-unknown", f"{THR} --axes q", "unknown axis"),
    C("axes-repeated", f"{SEG} --model ck.pt --axes z,z", "repeated"),
    C("threshold-with-tta", f"{THR} --tta", "labels only"),
    C("resume-and-overwrite", f"{THR} --resume --overwrite", "exclude each other"),
    C("no-model", SEG, "--model CKPT is required"),
    C("model-missing", f"{SEG} --model nope.pt", "checkpoint not found"),
    C("model-nan-weights", f"{SEG} --model nan_ck.pt", "weights hold NaN/inf"),
    C("model-nan-normalisation", f"{SEG} --model nan_norm_ck.pt", "normalisation"),
    C("model-zero-std", f"{SEG} --model zero_std_ck.pt", "normalisation"),
    C("model-truncated", f"{SEG} --model trunc_ck.pt", "cannot read checkpoint"),
    C("model-plain-state-dict", f"{SEG} --model plain.pt", "not a magseg-hpc checkpoint"),
    C("model-pickle", f"{SEG} --model pickle.pt", "pickled Python objects"),
    C("model-text", f"{SEG} --model text.pt", "cannot read checkpoint"),
    C("device-unknown", f"{THR} --device tpu", "--device tpu"),
    C("device-cuda-without-gpu", f"{THR} --device cuda --workers 1", "no CUDA GPU",
      marks=no_gpu),
    C("slurm-without-job", f"{THR} --cluster slurm", "needs --job"),
    C("slurm-without-sbatch", f"{THR} --cluster slurm --job jobs/local.yaml",
      "--cluster slurm but sbatch and srun not found on PATH", marks=no_sbatch),
    C("scheduler-and-cluster", f"{THR} --cluster slurm --job jobs/local.yaml "
      "--scheduler tcp://127.0.0.1:1", "exclude each other"),
    C("input-missing", "segment-volume nope.zarr o.zarr --method threshold", "no such file"),
    C("input-nan", "segment-volume nan.npy o.zarr --method threshold", "NaN or inf"),
    C("input-corrupt-chunk", "segment-volume cor.zarr o.zarr --method threshold",
      "cannot read its voxels"),
    C("lock-is-a-symlink", "segment-volume ph.zarr lsym.zarr --method threshold",
      "writer lock of .* is a symbolic link"),
    C("lock-is-a-folder", "segment-volume ph.zarr ldir.zarr --method threshold",
      "writer lock of .* is a folder"),
    C("input-png-slice-truncated", "segment-volume pngtrunc o.zarr --method threshold",
      r"z002\.png: cannot read its voxels"),
    C("input-zarr-symlink-loop", "segment-volume zloop.zarr o.zarr --method threshold",
      "looping link"),
    C("input-lost-chunk", "segment-volume lost.zarr o.zarr --method threshold",
      r"lost.zarr: 1 of 8 chunks of 'image' have no file \(first: image/c/1/0/1\) .*lost "
      "chunk files"),
    C("output-name-too-long", f"segment-volume ph.zarr {LONG}.zarr --method threshold",
      "longer than this file system allows"),
    C("input-2d", "segment-volume 2d.npy o.zarr --method threshold", "expected a 3D"),
    C("input-empty", "segment-volume empty3.npy o.zarr --method threshold", "empty"),
    C("output-is-input", "segment-volume ph.zarr ph.zarr --method threshold --overwrite",
      "is the input"),
    C("output-inside-input", "segment-volume ph.zarr ph.zarr/o.zarr --method threshold",
      "inside the input"),
    C("input-inside-output", "segment-volume outer.zarr/inner.npy outer.zarr "
      "--method threshold --overwrite", "lies inside the output"),
    C("output-is-model", "segment-volume ph.zarr ck.pt --model ck.pt", "is the input"),
    C("existing-store", "segment-volume ph.zarr lab.zarr --method threshold",
      "pass --resume to continue it or --overwrite"),
    C("overwrite-plain-folder", "segment-volume ph.zarr d --method threshold --overwrite",
      NOT_OURS, forbid="--overwrite"),
    C("overwrite-plain-folder-model", "segment-volume ph.zarr d --model ck.pt --overwrite",
      NOT_OURS, forbid="--overwrite"),
    C("resume-plain-folder", "segment-volume ph.zarr d --method threshold --resume",
      NOT_OURS, forbid="--overwrite"),
    C("overwrite-regular-file", "segment-volume ph.zarr file.txt --method threshold "
      "--overwrite", "regular file", forbid="--overwrite"),
    C("overwrite-foreign-zarr", "segment-volume ph.zarr foreign.zarr --method threshold "
      "--overwrite", NOT_OURS, forbid="--overwrite"),
    C("overwrite-image-store", "segment-volume good.npy ph.zarr --method threshold --overwrite",
      "is a magseg-hpc image store, and this command writes label stores"),
    C("overwrite-image-store-masks", "import-masks masks ph.zarr --colors colors.yaml "
      "--overwrite", "image store"),
    C("resume-without-run-record", "segment-volume ph.zarr lab.zarr --method threshold "
      "--resume", "no segment-volume run record"),
    C("output-under-a-file", "segment-volume ph.zarr file.txt/o.zarr --method threshold",
      "is a file, not a folder"),
    C("output-read-only", "segment-volume ph.zarr ro/o.zarr --method threshold",
      "not writable"),
]

TRAIN = [
    C("empty-config", "train --config empty.yaml --output-dir r", "is empty"),
    C("comments-only-config", "train --config comments.yaml --output-dir r", "is empty"),
    C("empty-mapping-config", "train --config braces.yaml --output-dir r", "is empty"),
    C("alias-bomb", "train --config bomb.yaml --output-dir r", "aliases"),
    C("python-tag", "train --config pytag.yaml --output-dir r", "not valid YAML"),
    C("list-config", "train --config list.yaml --output-dir r", "must be a YAML mapping"),
    C("unknown-key", "train --config unknown.yaml --output-dir r", "unknown config key 'trian'"),
    C("bad-type", "train --config badtype.yaml --output-dir r", "seed"),
    C("binary-config", "train --config binary.yaml --output-dir r", "not a text|not valid YAML"),
    C("missing-config", "train --config nope.yaml --output-dir r", "no shipped config"),
    C("config-is-folder", "train --config d --output-dir r", "cannot read config"),
    C("missing-volume", "train --config novolume.yaml --output-dir r", "does not exist"),
    C("override-missing-volume", "train --config tiny.yaml --output-dir r data.volume=nope.zarr",
      "does not exist"),
    C("override-not-key-value", "train --config tiny.yaml --output-dir r lr", "not key=value"),
    # refused inside training, after the run folder was claimed: no half-made folder remains
    C("train-no-training-slices", "train --config tiny.yaml --output-dir r data.n_val=8",
      "leaves no training slices"),
    C("override-unknown-key", "train --config tiny.yaml --output-dir r train.lrr=1",
      "unknown config key"),
    C("override-bad-value", "train --config tiny.yaml --output-dir r train.lr=abc", "train.lr"),
    C("override-alias", "train --config tiny.yaml --output-dir r 'name=*a'", "aliases|YAML"),
    C("lr-zero", "train --config tiny.yaml --output-dir r train.lr=0",
      "train.lr must be a number > 0"),
    C("lr-inf", "train --config tiny.yaml --output-dir r train.lr=.inf", "train.lr must be"),
    C("head-lr-negative", "train --config tiny.yaml --output-dir r train.head_lr_mult=-1",
      "train.head_lr_mult must be a number > 0"),
    C("threshold-nan", "train --config tiny.yaml --output-dir r train.threshold=.nan",
      r"train.threshold \(pseudo-label confidence\) must be in \[0, 1\]"),
    C("threshold-negative", "train --config tiny.yaml --output-dir r train.threshold=-5",
      "train.threshold"),
    C("momentum-nan", "train --config tiny.yaml --output-dir r train.momentum=.nan",
      r"train.momentum must be in \[0, 1\), got nan"),
    C("momentum-one", "train --config tiny.yaml --output-dir r train.momentum=1",
      r"train.momentum must be in \[0, 1\)"),
    C("weight-decay-nan", "train --config tiny.yaml --output-dir r train.weight_decay=.nan",
      "train.weight_decay must be a finite number, got nan"),
    C("uns-weight-nan", "train --config tiny.yaml --output-dir r train.uns_weight=nan",
      "train.uns_weight must be a finite number, got nan"),
    C("poly-power-nan", "train --config tiny.yaml --output-dir r train.poly_power=.nan",
      "train.poly_power must be a finite number, got nan"),
    C("poly-power-negative", "train --config tiny.yaml --output-dir r train.poly_power=-1",
      "train.poly_power must be >= 0"),
    C("scale-range-inf", "train --config tiny.yaml --output-dir r "
      "'train.scale_range=[0.5, .inf]'", "train.scale_range must be a finite number"),
    C("labeled-split-out-of-range", "train --config tiny.yaml --output-dir r "
      "data.labeled_split=split_big.txt",
      r"data.labeled_split \S*split_big.txt: '100' is not a slice index in 0..7 along z"),
    C("labeled-split-negative", "train --config tiny.yaml --output-dir r "
      "data.labeled_split=split_neg.txt", r"split_neg.txt: '-1' is not a slice index"),
    C("labeled-split-text", "train --config tiny.yaml --output-dir r "
      "data.labeled_split=split_abc.txt", r"split_abc.txt: 'abc' is not a slice index"),
    C("duplicate-key", "train --config dupkey.yaml --output-dir r",
      r"not valid YAML: key 'seed' is given twice \(line \d+ and line \d+\)"),
    C("batch-one", "train --config tiny.yaml --output-dir r train.batch_size=1",
      r"train.batch_size must be >= 2 \(BatchNorm"),
    C("model-null", "train --config tiny.yaml --output-dir r model=null",
      "config section 'model' is null"),
    C("seed-huge", "train --config tiny.yaml --output-dir r seed=1180591620717411303424",
      r"seed must be in \[0, 2\*\*63\)"),
    C("epochs-zero", "train --config tiny.yaml --output-dir r train.epochs=0", "train.epochs"),
    C("batch-negative", "train --config tiny.yaml --output-dir r train.batch_size=-1",
      "train.batch_size"),
    C("ema-one", "train --config tiny.yaml --output-dir r train.ema_decay=1", "ema_decay"),
    C("strong-pool", "train --config tiny.yaml --output-dir r train.strong_ops=wild", "strong_ops"),
    C("strong-op", "train --config tiny.yaml --output-dir r 'train.strong_ops=[blur, hue]'",
      "strong_ops"),
    C("scale-range", "train --config tiny.yaml --output-dir r 'train.scale_range=[2, 1]'",
      "scale_range"),
    C("backbone", "train --config tiny.yaml --output-dir r model.backbone=resnet7", "backbone"),
    C("seed-negative", "train --config tiny.yaml --output-dir r seed=-1", "seed must be"),
    C("output-dir-is-file", "train --config tiny.yaml --output-dir file.txt",
      "regular file; give a folder path"),
    C("output-dir-is-input", "train --config tiny.yaml --output-dir ph.zarr", "is the input"),
    C("output-dir-inside-input", "train --config tiny.yaml --output-dir ph.zarr/run",
      "inside the input"),
    C("output-dir-under-a-file", "train --config tiny.yaml --output-dir file.txt/run",
      "is a file, not a folder"),
    C("output-dir-read-only", "train --config tiny.yaml --output-dir ro/run", "not writable"),
    C("another-experiment", "train --config tiny.yaml --output-dir run train.lr=0.5",
      "another experiment"),
    C("output-dir-of-a-user", "train --config tiny.yaml --output-dir mine",
      "mine is not empty and not a magseg-hpc run folder .it holds config.yaml, "
      "metrics.jsonl, splits."),
    C("output-dir-with-a-copied-marker", "train --config tiny.yaml --output-dir mine_marked",
      r"mine_marked is not empty and not a magseg-hpc run folder .*; its \.magseg-run\.json was "
      r"made for \S*/run, not this folder"),
    C("label-value-outside-the-table", "train --config tiny.yaml --output-dir r "
      "data.volume=ph7.zarr", r"ph7.zarr: z slice 2 holds the label value\(s\) 7, outside the "
      r"class table \(0..2: background, domain_minus, domain_plus; 255 unlabelled\)"),
    C("label-value-outside-the-table-supervised", "train --config tiny.yaml --output-dir r "
      "data.volume=ph7.zarr train.method=supervised", "z slice 2 holds the label value"),
    C("lock-is-a-symlink", "train --config tiny.yaml --output-dir lsym.zarr",
      r"lsym.zarr.magseg-lock \(the writer lock of \S*lsym.zarr\) is a symbolic link"),
    C("no-config-flag", "train --output-dir r", "required"),
]

SUB_SEG = "submit segment --dry-run --cluster local --"
SUBMIT = [
    C("train-empty-config", "submit train --config empty.yaml --dry-run", "is empty"),
    C("train-output-dir-of-a-user", "submit train --config tiny.yaml --dry-run --output-dir mine",
      "not a magseg-hpc run folder"),
    C("train-output-dir-with-a-copied-marker", "submit train --config tiny.yaml --dry-run "
      "--output-dir mine_marked", r"not a magseg-hpc run folder .*was made for \S*/run"),
    C("train-batch-one", "submit train --config tiny.yaml --cluster local train.batch_size=1",
      "train.batch_size must be >= 2"),
    C("train-alias-bomb", "submit train --config bomb.yaml --dry-run", "aliases"),
    C("train-missing-volume", "submit train --config novolume.yaml --cluster local",
      "does not exist"),
    C("train-output-dir-file", "submit train --config tiny.yaml --dry-run --output-dir file.txt",
      "give a folder path"),
    C("train-output-inside-input", "submit train --config tiny.yaml --dry-run "
      "--output-dir ph.zarr/run", "inside the input"),
    C("train-job-missing", "submit train --config tiny.yaml --job nope.yaml --dry-run",
      "cannot read job profile"),
    C("train-job-bad-yaml", "submit train --config tiny.yaml --job badjob.yaml --dry-run",
      "not valid YAML"),
    C("train-job-alias-bomb", "submit train --config tiny.yaml --job bombjob.yaml --dry-run",
      "aliases"),
    C("train-job-unknown-key", "submit train --config tiny.yaml --job unknownjob.yaml --dry-run",
      "partitoin"),
    C("train-job-duplicate-key", "submit train --config tiny.yaml --job dupjob.yaml --dry-run",
      "key 'partition' is given twice"),
    C("train-bad-name", "submit train --config tiny.yaml --name 'a b' --dry-run", "run name"),
    C("segment-no-args", "submit segment --dry-run --cluster local", "no segment-volume arguments"),
    C("segment-bad-flag", f"{SUB_SEG} ph.zarr o.zarr --method threshold --workers=-2",
      "--workers -2"),
    C("segment-batch-zero", f"{SUB_SEG} ph.zarr o.zarr --method threshold --batch-size 0",
      "--batch-size 0"),
    C("segment-dashboard", f"{SUB_SEG} ph.zarr o.zarr --method threshold "
      "--dashboard-address zzz:-5", "--dashboard-address"),
    C("segment-existing-output", f"{SUB_SEG} ph.zarr lab.zarr --method threshold",
      "already exists"),
    C("segment-foreign-output", f"{SUB_SEG} ph.zarr d --method threshold --overwrite",
      NOT_OURS, forbid="--overwrite"),
    C("segment-output-is-input", f"{SUB_SEG} ph.zarr ph.zarr --method threshold --overwrite",
      "is the input"),
    C("segment-missing-input", f"{SUB_SEG} nope.zarr o.zarr --method threshold",
      "does not exist"),
    C("segment-missing-model", f"{SUB_SEG} ph.zarr o.zarr --model nope.pt", "does not exist"),
    C("segment-unknown-flag", f"{SUB_SEG} ph.zarr o.zarr --frobnicate", "unrecognized"),
    C("segment-two-nodes", "submit segment --dry-run --cluster local --nodes 2 -- ph.zarr "
      "o.zarr --method threshold", "one node"),
    C("segment-local-job-with-slurm-workers", "submit segment --cluster local -- ph.zarr "
      "o.zarr --method threshold --cluster slurm --job jobs/local.yaml",
      "sbatch and srun not found on PATH", marks=no_sbatch),
    C("evaluate-incomplete", "submit evaluate --dry-run --cluster local -- incomplete.zarr "
      "ph.zarr", "marked incomplete"),
    C("evaluate-report-folder", "submit evaluate --dry-run --cluster local -- lab.zarr ph.zarr "
      "--report d", "is a folder"),
    C("evaluate-missing-truth", "submit evaluate --dry-run --cluster local -- lab.zarr nope.zarr",
      "does not exist"),
]

CONFIGS = [
    C("missing-path", "configs nope/x.yaml", "cannot read config nope/x.yaml: No such file"),
    C("folder", "configs d", "cannot read config d: Is a directory"),
    C("binary-file", "configs binary.yaml", "not a text"),
]

DEMO = [
    C("missing-config", "demo dd --config nope.yaml", "no shipped config of that name"),
    C("foreign-folder", "demo d --config tiny.yaml --overwrite", NOT_OURS,
      forbid="--overwrite"),
    C("output-is-file", "demo file.txt --config tiny.yaml", "regular file"),
    # a folder holding the names the demo writes is still not the demo's (no manifest)
    C("folder-with-demo-names", "demo demo_like --config tiny.yaml --overwrite", NOT_OURS,
      forbid="--overwrite"),
    C("iters-zero-overwrite", "demo demo_like --config tiny.yaml --overwrite --iters 0",
      "--iters must be >= 1, got 0"),
    C("iters-zero", "demo dd --config tiny.yaml --iters 0", "--iters must be >= 1"),
    C("shape-text", "demo dd --config tiny.yaml --shape a,b,c", "three positive integers"),
    C("snr-zero", "demo dd --config tiny.yaml --snr 0", r"--snr 0.0: must be > 0"),
    C("preset-unknown", "demo dd --config tiny.yaml --preset nope", "invalid choice"),
    C("config-override-bad", "demo dd --config badtype.yaml", "seed"),
]

CASES = [
    *[pytest.param(*p.values, id=f"ingest-{p.id}", marks=p.marks) for p in INGEST],
    *[pytest.param(*p.values, id=f"info-{p.id}", marks=p.marks) for p in INFO],
    *[pytest.param(*p.values, id=f"make-phantom-{p.id}", marks=p.marks) for p in PHANTOM],
    *[pytest.param(*p.values, id=f"import-masks-{p.id}", marks=p.marks) for p in MASKS],
    *[pytest.param(*p.values, id=f"export-slices-{p.id}", marks=p.marks) for p in EXPORT],
    *[pytest.param(*p.values, id=f"preview-{p.id}", marks=p.marks) for p in PREVIEW],
    *[pytest.param(*p.values, id=f"evaluate-{p.id}", marks=p.marks) for p in EVALUATE],
    *[pytest.param(*p.values, id=f"segment-volume-{p.id}", marks=p.marks) for p in SEGMENT],
    *[pytest.param(*p.values, id=f"train-{p.id}", marks=p.marks) for p in TRAIN],
    *[pytest.param(*p.values, id=f"submit-{p.id}", marks=p.marks) for p in SUBMIT],
    *[pytest.param(*p.values, id=f"configs-{p.id}", marks=p.marks) for p in CONFIGS],
    *[pytest.param(*p.values, id=f"demo-{p.id}", marks=p.marks) for p in DEMO],
]


def test_there_are_at_least_200_cases():
    assert len(CASES) >= 200


def _check(world, request, run, argv, pattern, forbid, max_seconds=30):
    if any(a.startswith("ro/") for a in argv) and not world["read_only"]:
        pytest.skip("no way to make a read-only folder here")
    root = world["path"]
    before = snapshot(root)
    t0 = time.perf_counter()
    code, err = run(argv)
    seconds = time.perf_counter() - t0
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert re.match(r"(magseg-hpc|python -m magseg_hpc\.submit)[\w -]*: error: ", lines[0]), err
    assert re.search(pattern, lines[0]), f"{pattern!r} not in: {lines[0]}"
    if forbid:
        assert forbid not in lines[0], f"suggests {forbid}: {lines[0]}"
    assert snapshot(root) == before, "files changed, appeared or vanished"
    assert seconds < max_seconds, f"took {seconds:.1f} s"
    return seconds


@pytest.mark.parametrize(("argv", "pattern", "forbid"), CASES)
def test_bad_input(world, request, monkeypatch, argv, pattern, forbid):
    monkeypatch.chdir(world["path"])
    if request.node.get_closest_marker("without_slurm"):
        monkeypatch.setenv("PATH", _path_without("sbatch", "srun"))
    seconds = _check(world, request, run_in_process, argv, pattern, forbid)
    if "bomb" in " ".join(argv):
        assert seconds < 5, f"the alias bomb took {seconds:.1f} s"


def _path_without(*commands: str) -> str:
    """PATH less every folder that holds one of ``commands`` (the case runs in this process:
    it starts no other program)."""
    keep = [folder for folder in os.environ.get("PATH", "").split(os.pathsep)
            if not any(os.path.exists(os.path.join(folder, c)) for c in commands)]
    assert all(shutil.which(c, path=os.pathsep.join(keep)) is None for c in commands)
    return os.pathsep.join(keep)


def _run_subprocess(argv: list[str]) -> tuple[int, str]:
    module = "magseg_hpc.submit" if argv[:1] == ["submit"] else "magseg_hpc.cli"
    args = argv[1:] if argv[:1] == ["submit"] else argv
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                       timeout=600, env=env)
    return r.returncode, r.stderr


# Both entry points (magseg-hpc and python -m magseg_hpc.submit) as fresh interpreters: one
# line and exit 2 from the process itself (the table above runs every case in this process).
@pytest.mark.parametrize(("argv", "pattern", "forbid"), [
    C("argparse", "ingest good.npy o.zarr --chunks 0,1,1", "three positive integers"),
    C("submit-empty-config", "submit train --config empty.yaml --dry-run", "is empty"),
])
def test_bad_input_as_a_process(world, request, monkeypatch, argv, pattern, forbid):
    monkeypatch.chdir(world["path"])
    # a fresh interpreter imports torch, dask...: slow on a loaded machine, so no time limit
    _check(world, request, _run_subprocess, argv, pattern, forbid, max_seconds=600)


def test_overwrite_replaces_a_store_of_ours(world, tmp_path, monkeypatch):
    """The other side of the refusals: --overwrite still replaces what this tool wrote."""
    from magseg_hpc.volume.io import open_volume

    monkeypatch.chdir(tmp_path)
    shutil.copytree(world["path"] / "ph.zarr", "mine.zarr")
    code, err = run_in_process(["ingest", str(world["path"] / "good.npy"), "mine.zarr",
                                "--overwrite"])
    assert code == 0, err
    assert open_volume("mine.zarr").dtype == np.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.zarr"]  # no staging left


def test_dry_run_leaves_no_folder(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["submit", "segment", "--dry-run", "--", str(world["path"] /
                                "ph.zarr"), "o.zarr", "--method", "threshold"])
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []


def test_diverging_training_stops_without_best_checkpoint(world, tmp_path, monkeypatch):
    """train.lr=1e30: exit 2 naming the divergence, no best.pt, no NaN checkpoint."""
    monkeypatch.chdir(world["path"])
    out = tmp_path / "diverged"
    code, err = run_in_process(["train", "--config", "tiny.yaml", "--output-dir", str(out),
                                "train.lr=1e30", "train.epochs=4", "train.max_iters=4",
                                "train.eval_every=4", "train.checkpoint_every=4",
                                "train.method=supervised"])
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert len(lines) == 1 and "diverged" in lines[0], err
    assert not (out / "best.pt").exists()
    if (out / "checkpoint.pt").exists():
        from magseg_hpc.models.checkpoint import load_checkpoint, nonfinite_tensors

        assert not nonfinite_tensors(load_checkpoint(out / "checkpoint.pt")["student"])
    # the failed run does not poison its folder: a corrected retry is not "another experiment"
    code, err = run_in_process(["train", "--config", "tiny.yaml", "--output-dir", str(out)])
    assert code == 0, err
    assert (out / "checkpoint.pt").exists()


def test_unwritable_tensorboard_folder_is_one_line(world, tmp_path, monkeypatch):
    """TensorBoard's writer thread would print its own traceback beside the error."""
    monkeypatch.chdir(world["path"])
    run = tmp_path / "run"
    shutil.copytree(world["path"] / "run", run)
    board = run / "tensorboard"
    shutil.rmtree(board)
    board.mkdir()
    locked = _immutable(board, True)
    if not locked:  # no way to make a folder read-only here: a file in its place
        board.rmdir()
        board.write_text("mine\n")
    try:
        code, err = run_in_process(["train", "--config", "tiny.yaml", "--output-dir", str(run)])
    finally:
        if locked:
            _immutable(board, False)
    lines = [line for line in err.splitlines() if "error:" in line or "Traceback" in line
             or "Exception" in line]
    assert code == 2 and len(lines) == 1, err
    assert re.search(r"run/tensorboard (cannot take event files|is not a folder).*TensorBoard "
                     "writes there", lines[0]), err


def test_failed_run_folder_accepts_a_corrected_retry(world, tmp_path, monkeypatch):
    """A run that failed on a missing volume leaves nothing that refuses the fixed retry."""
    from magseg_hpc.config import config_from_dict
    from magseg_hpc.errors import MagsegError
    from magseg_hpc.train import run_training

    out = tmp_path / "retry"
    broken = _tiny_config(str(tmp_path / "missing.zarr"))
    with pytest.raises(MagsegError):
        run_training(config_from_dict(broken), out)
    fixed = _tiny_config(str(world["path"] / "ph.zarr"), lr=0.02)
    summary = run_training(config_from_dict(fixed), out)
    assert summary["iterations"] == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.02
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["iteration"] == 1
