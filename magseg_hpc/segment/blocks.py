"""The slab plan: which slices each task reads and which output region it writes.

A *slab* is a run of consecutive slices along one axis (z, y or x), covering the full extent of
the other two axes. Slab boundaries are multiples of the output's chunk size along that axis,
so every task writes whole chunks (zarr needs no locks for that; partial-chunk writes would
race). The plan is a pure function of shapes and chunk sizes, which is what makes it part of
the resume fingerprint.

Reading plan for arbitrary input chunking: we do **not** rechunk. Each task reads its own slab
straight from the input store; a slab reads every input chunk it overlaps, once. An input
chunk is therefore read ``ceil(chunk_extent / slab_extent) + 1`` times at most along the slab
axis (once when chunks and slabs line up, e.g. z-chunked input and z slabs). For y/x passes
over a z-chunked store each chunk is read once per y (or x) slab it overlaps, i.e.
``~chunk_y / slab_y`` times; a larger ``--slab-size`` trades memory for fewer re-reads.
Memory per task is bounded by one slab (plus the chunks it overlaps), never by the volume.
"""

from __future__ import annotations

from dataclasses import dataclass

from magseg_hpc.axes import AXES


@dataclass(frozen=True)
class Slab:
    """Slices ``start:stop`` along ``axis`` of a volume, full extent on the other axes."""

    stage: str  # "z", "y", "x" (a segmentation pass) or "fuse"
    index: int
    axis: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.stage}[{self.start}:{self.stop}]"

    @property
    def key(self) -> str:
        return f"{self.stage}-{self.index:06d}"

    def region(self, shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        """The (z, y, x) region of the volume this slab covers."""
        region = [slice(0, n) for n in shape]
        region[AXES.index(self.axis)] = slice(self.start, self.stop)
        return tuple(region)  # type: ignore[return-value]

    def num_slices(self) -> int:
        return self.stop - self.start


def aligned_slab_size(requested: int, chunk: int) -> int:
    """The smallest multiple of ``chunk`` that holds ``requested`` slices."""
    requested = max(1, int(requested))
    return -(-requested // chunk) * chunk


def plan_axis(stage: str, axis: str, extent: int, chunk: int, slab_size: int) -> list[Slab]:
    """Slabs along one axis, boundaries on multiples of ``chunk``; the last may be short."""
    step = aligned_slab_size(slab_size, chunk)
    return [
        Slab(stage, i, axis, start, min(start + step, extent))
        for i, start in enumerate(range(0, extent, step))
    ]


def plan_passes(
    shape: tuple[int, int, int], axes: tuple[str, ...], pass_chunks: dict[str, int],
    fuse_chunk: int, slab_size: int,
) -> list[Slab]:
    """Every slab of every segmentation pass, plus the fusion slabs when there are several axes.

    ``pass_chunks[a]`` is the chunk extent along ``a`` of the store that pass ``a`` writes (the
    output for a single pass, its scratch array otherwise); ``fuse_chunk`` is the output's z
    chunk, along which the fusion writes.
    """
    slabs: list[Slab] = []
    for axis in axes:
        i = AXES.index(axis)
        slabs += plan_axis(axis, axis, shape[i], pass_chunks[axis], slab_size)
    if len(axes) > 1:
        slabs += plan_axis("fuse", "z", shape[0], fuse_chunk, slab_size)
    return slabs


def output_chunks(
    shape: tuple[int, int, int], axes: tuple[str, ...], slab_size: int, plane: int = 256
) -> tuple[int, int, int]:
    """Output chunks: one slab deep along the axis that writes it, tiles of ``plane`` elsewhere.

    The output is written along z (a z pass, or the fusion of several passes) except for a
    single y or x pass, which writes y (or x) slabs directly.
    """
    chunks = [min(plane, n) for n in shape]
    axis = axes[0] if len(axes) == 1 else "z"
    i = AXES.index(axis)
    chunks[i] = min(slab_size, shape[i])
    return tuple(chunks)  # type: ignore[return-value]


def scratch_chunks(shape: tuple[int, int, int], axis: str, slab_size: int, plane: int = 256):
    """Chunks of the per-axis probability scratch array (classes first).

    ``slab_size`` along the pass axis (so each pass writes whole chunks) and along z (so the
    fusion, which reads z slabs, reads each scratch chunk exactly once); tiles elsewhere.
    """
    chunks = [min(plane, n) for n in shape]
    chunks[0] = min(slab_size, shape[0])
    i = AXES.index(axis)
    chunks[i] = min(slab_size, shape[i])
    return (None, *chunks)
