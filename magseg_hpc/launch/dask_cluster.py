"""Where slab tasks run: a local Dask cluster, an existing scheduler, or SLURM jobs.

``open_cluster`` is a context manager that yields a ``ClusterHandle`` (client, dashboard link,
the torch threads each task should use) and always closes what it started, also on errors and
Ctrl-C, so no SLURM job outlives the command.

Local sizing (``local_cluster_size``): one Dask worker *process* per GPU when CUDA is used;
on CPU, ``threads`` torch threads per worker (default min(cores, 4)) and ``cores // threads``
workers. Each worker runs one slab at a time (one Dask thread): the model forward is the
bottleneck and already uses all its torch threads, and one slab at a time bounds memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from magseg_hpc.cpus import available_cores
from magseg_hpc.errors import MagsegError
from magseg_hpc.launch.profile import (
    JobProfile,
    dask_jobqueue_kwargs,
    job_profile_from_dict,
    load_job_profile,
)
from magseg_hpc.outputs import removing_new_folders

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD = "127.0.0.1:8787"


@dataclass
class ClusterHandle:
    client: object
    kind: str  # "local", "scheduler", "slurm"
    dashboard_link: str | None
    torch_threads: int | None  # None: each worker derives it from its CPUs and Dask threads
    description: str
    cluster: object = None
    dashboard_closed: bool = False

    def close_dashboard(self) -> None:
        """Close the pages open on the dashboard of a scheduler this command started (after
        their last update) and take no new ones, so that a page keeps the run's final
        progress and no dashboard connection dies with the cluster (bokeh's "WebSocket
        connection closed" and unsent messages in the terminal). Once; best effort."""
        if self.kind == "scheduler" or self.dashboard_closed or self.dashboard_link is None:
            return  # a scheduler of someone else's: its dashboard is theirs
        self.dashboard_closed = True
        try:
            n = self.client.run_on_scheduler(_close_dashboard_pages)
        except Exception as e:  # noqa: BLE001 - the run's result stands; the pages close later
            log.debug("closing the dashboard's pages: %s: %s", type(e).__name__, e)
        else:
            log.debug("closed %d dashboard page connections", n)

    def announce(self) -> None:
        """The cluster and dashboard lines every command with a cluster prints first."""
        print(self.description, flush=True)
        print(f"dashboard: {self.dashboard_link or 'none (no dashboard on this scheduler)'}",
              flush=True)


def local_cluster_size(
    cores: int, gpus: int, workers: int | None, threads: int | None
) -> tuple[int, int]:
    """(Dask workers, torch threads per worker) for a local cluster. Pure, unit-tested."""
    if gpus > 0:
        n = workers or gpus
        return n, threads or max(1, cores // n)
    if threads is None:
        threads = max(1, cores // workers) if workers else min(cores, 4)
    return workers or max(1, cores // threads), threads


def _cuda_devices(device: str) -> int:
    if device == "cpu":
        return 0
    import torch

    # device_count does not initialise CUDA here, so spawned workers can still use it.
    n = torch.cuda.device_count()
    if device.startswith("cuda") and n == 0:
        raise MagsegError(f"--device {device}: no CUDA GPU visible; use --device cpu or auto")
    return n


ALLOW_ORIGIN_KEY = "distributed.scheduler.dashboard.bokeh-application.allow_websocket_origin"


def _port_free(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host``, else a free port chosen by the system."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            s.bind((host, 0))
        return s.getsockname()[1]


def dashboard_origins(address: str) -> tuple[str, list[str] | None]:
    """(HOST:PORT with a concrete port, the origins its dashboard accepts).

    Dask's default accepts websocket connections from any origin ("*", with bokeh's warning);
    a dashboard on one host accepts that host only. For 0.0.0.0 (all interfaces) or an
    unresolvable host the Dask default stays (origins None).
    """
    host, _, port = str(address).rpartition(":")
    host = host or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):
        return address, None
    try:
        wanted = int(port or 8787)
        port = _port_free(host.strip("[]"), wanted)
    except (OSError, ValueError):
        return address, None
    if wanted and port != wanted:
        log.warning("dashboard port %d on %s is taken (another dashboard or program); using "
                    "%d instead (--dashboard-address HOST:PORT picks one)", wanted, host, port)
    origins = [f"{host}:{port}"]
    if host in ("127.0.0.1", "localhost"):
        origins = [f"127.0.0.1:{port}", f"localhost:{port}"]
    return f"{host}:{port}", origins


# How long an open dashboard page is given for its last update (Dask updates it every 100 ms)
# before its connection is closed, and how long its browser has to answer the close.
DASHBOARD_LAST_UPDATE_S = 0.5
DASHBOARD_CLOSE_WAIT_S = 2.0


async def _close_dashboard_pages(dask_scheduler=None) -> int:
    """On the scheduler's event loop: stop taking new dashboard pages, let the open ones take
    their last update, then close their websockets with a proper close frame. Returns how
    many were open. (bokeh lists a server's connections in ``_clients`` only; without it,
    nothing is closed here and the pages close with the cluster, as before.)"""
    try:
        from bokeh.server.tornado import BokehTornado
    except ImportError:
        return 0
    routing = getattr(dask_scheduler, "http_application", None)
    apps = [a for a in getattr(routing, "applications", ()) if isinstance(a, BokehTornado)]
    server = getattr(dask_scheduler, "http_server", None)
    if server is not None:
        server.stop()  # listening only: the open pages stay connected
    pages = [c for a in apps for c in list(getattr(a, "_clients", ()))]
    if not pages:
        return 0
    await asyncio.sleep(DASHBOARD_LAST_UPDATE_S)
    for page in pages:
        with contextlib.suppress(Exception):
            page._socket.close(1001, "the run is over")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DASHBOARD_CLOSE_WAIT_S
    while any(getattr(a, "_clients", ()) for a in apps) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return len(pages)


TASK_STREAM_TOOLTIP = """
    <div><span style="font-size: 12px; font-weight: bold;">@key</span></div>
    <div><span style="font-size: 10px; font-family: Monaco, monospace;">@name:
    @duration_text</span></div>
"""


def name_tasks_in_task_stream() -> None:
    """The dashboard's task stream (in this process's schedulers): its hover names a task by
    its key (``segment-slab-0032-z-...``: the slab) above Dask's name and duration, and each
    task is drawn with a white edge, so that slabs back to back read as separate boxes.

    Dask names and colours a task in the stream by its key's prefix, which is also its group
    on the progress plot: one prefix per slab would make one progress bar per slab, hence the
    key in the hover instead. Idempotent; nothing without bokeh."""
    try:
        from bokeh.models import HoverTool
        from distributed.dashboard.components import scheduler as components
    except ImportError:
        return
    original = components.task_stream_figure
    if getattr(original, "names_keys", False):
        return

    @functools.wraps(original)
    def task_stream_figure(*args, **kwargs):
        source, root = original(*args, **kwargs)
        for tool in root.tools:
            if isinstance(tool, HoverTool) and "@name" in str(tool.tooltips):
                tool.tooltips = TASK_STREAM_TOOLTIP
        for renderer in root.renderers:
            glyph = getattr(renderer, "glyph", None)
            if type(glyph).__name__ == "Rect":
                glyph.line_color, glyph.line_width, glyph.line_alpha = "white", 1, 1.0
        return source, root

    task_stream_figure.names_keys = True  # type: ignore[attr-defined]
    components.task_stream_figure = task_stream_figure


class AbandonedCloseTimeouts(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" for a TimeoutError: a close step
    of Dask's (tornado's timed waits) that timed out as the cluster's event loop stopped, so
    nothing was left to read it. It is printed long after the run's summary and says nothing
    about the run: a failed slab is the run's own one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, TimeoutError)
                    and record.getMessage().startswith("Future exception was never retrieved"))


def quiet_dask_logs() -> None:
    """Dask sets its own log levels when imported: keep its chatter out unless -v."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("distributed", "dask_jobqueue", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.WARNING)
        loop_log = logging.getLogger("asyncio")
        if not any(isinstance(f, AbandonedCloseTimeouts) for f in loop_log.filters):
            loop_log.addFilter(AbandonedCloseTimeouts())


@contextlib.contextmanager
def open_cluster(
    *,
    scheduler: str | None = None,
    cluster: str | None = None,
    job: str | None = None,
    jobs: int = 1,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    device: str = "auto",
    dashboard_address: str = DEFAULT_DASHBOARD,
    processes: bool = True,
    connect_timeout: float = 5.0,
    wait_timeout: float = 300.0,
) -> Iterator[ClusterHandle]:
    from distributed import Client

    quiet_dask_logs()
    name_tasks_in_task_stream()
    if scheduler and cluster:
        raise MagsegError("--scheduler and --cluster exclude each other; pick one")
    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{connect_timeout}s")
        except (OSError, TimeoutError, ValueError) as e:
            raise MagsegError(
                f"cannot reach the Dask scheduler at {scheduler} ({type(e).__name__}); check "
                "the address (tcp://HOST:PORT) and that the scheduler is running"
            ) from e
        try:
            n = len(client.scheduler_info().get("workers", {}))
            yield ClusterHandle(client, "scheduler", client.dashboard_link, threads_per_worker,
                                f"existing scheduler {scheduler} ({n} workers)")
        finally:
            client.close()
        return
    if cluster == "slurm":
        with _slurm_cluster(job, jobs, device, dashboard_address, wait_timeout) as handle:
            yield handle
        return
    if cluster not in (None, "local"):
        raise MagsegError(f"--cluster {cluster}: choose slurm (or leave it out for local)")
    import dask
    from distributed import LocalCluster

    gpus = _cuda_devices(device)
    n, threads = local_cluster_size(available_cores(), gpus, workers, threads_per_worker)
    address, origins = dashboard_origins(dashboard_address)
    with dask.config.set({ALLOW_ORIGIN_KEY: origins} if origins else {}):
        local = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=processes,
            dashboard_address=address, resources={"GPU": 1} if gpus else None,
            # worker processes: a failed task is reported by the run, in one line
            silence_logs=logging.CRITICAL,
        )
    client = Client(local)
    link = f"http://{address}/status" if origins else client.dashboard_link
    handle = ClusterHandle(
        client, "local", link, threads,
        f"local cluster: {n} worker{'s' * (n > 1)} x {threads} torch threads"
        + (f", {gpus} GPUs" if gpus else ""), local,
    )
    try:
        yield handle
    finally:
        handle.close_dashboard()
        client.close()
        local.close()


def slurm_cluster_kwargs(profile: JobProfile | dict, dashboard_address: str) -> dict:
    """SLURMCluster keyword arguments from a job profile (or its mapping, validated)."""
    if not isinstance(profile, JobProfile):
        profile = job_profile_from_dict(profile)
    return dask_jobqueue_kwargs(profile, dashboard_address)


@contextlib.contextmanager
def _slurm_cluster(job, jobs, device, dashboard_address, wait_timeout):
    if not job:
        raise MagsegError("--cluster slurm needs --job jobs/PROFILE.yaml (partition, cpus...)")
    if jobs < 1:
        raise MagsegError("--jobs must be at least 1")
    try:
        import dask_jobqueue  # noqa: F401 - checked here, used by _slurm_client
    except ImportError as e:
        raise MagsegError("--cluster slurm needs dask-jobqueue; pip install dask-jobqueue") from e

    kwargs = dask_jobqueue_kwargs(load_job_profile(job), dashboard_address)
    log_dir = Path.cwd() / "runs" / "dask-slurm"
    with removing_new_folders(log_dir):  # kept only when the jobs wrote logs there
        log_dir.mkdir(parents=True, exist_ok=True)
        with _slurm_client(kwargs, log_dir, jobs, wait_timeout) as (client, slurm):
            handle = ClusterHandle(client, "slurm", client.dashboard_link, None,
                                   f"SLURM: {jobs} jobs from {job}", slurm)
            try:
                yield handle
            finally:
                handle.close_dashboard()


@contextlib.contextmanager
def _slurm_client(kwargs: dict, log_dir: Path, jobs: int, wait_timeout: float):
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    slurm = SLURMCluster(**kwargs, log_directory=str(log_dir))
    client = None
    try:
        slurm.scale(jobs=jobs)
        client = Client(slurm)
        log.info("waiting for SLURM workers (%d jobs)", jobs)
        try:
            client.wait_for_workers(1, timeout=wait_timeout)
        except TimeoutError as e:
            raise MagsegError(
                f"no SLURM worker started within {wait_timeout:.0f} s; check squeue and "
                f"the job logs in {log_dir}"
            ) from e
        yield client, slurm
    finally:
        # Always cancel the jobs, whatever happened (volara #33: leaked GPU workers).
        if client is not None:
            client.close()
        slurm.close()
