"""Distributed state in one place; degrades to a single process.

The world comes from the environment that torchrun and submitit's
``TorchDistributedEnvironment`` export: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``. With ``WORLD_SIZE`` unset or 1 nothing is initialised and
every collective below is a no-op. On GPUs the backend is NCCL and each process uses
``cuda:LOCAL_RANK`` (or ``cuda:0`` when a launcher gave each process its own GPU through
``CUDA_VISIBLE_DEVICES`` and set ``MAGSEG_GPU_PER_PROCESS=1``); on CPU it is gloo.

Multi-node: gloo binds to the address this host's name resolves to. When that is a loopback
address but ``MASTER_ADDR`` is not (a node whose /etc/hosts maps its own name to 127.0.0.1),
``GLOO_SOCKET_IFNAME`` is set to the interface that routes to ``MASTER_ADDR``. Rendezvous and
collectives time out after ``MAGSEG_DIST_TIMEOUT_S`` seconds (default 600): a lost node fails
the job instead of hanging it until its time limit.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from magseg_hpc.errors import MagsegError

log = logging.getLogger(__name__)

__all__ = [
    "DistEnv",
    "read_world",
    "resolve_device",
    "init_distributed",
    "shutdown",
    "barrier",
    "all_reduce_sum",
    "broadcast_object",
    "broadcast_buffers",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None for a single process
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise MagsegError(f"environment variable {name}={text!r} is not an integer") from None


def read_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment; (0, 1, 0) when not distributed."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world_size > 1 else 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise MagsegError(
            f"inconsistent distributed environment RANK={rank} WORLD_SIZE={world_size}; "
            "launch with torchrun or submit, which set both"
        )
    return rank, world_size, local_rank


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks ``cuda:LOCAL_RANK`` when a GPU is visible, else the CPU."""
    if requested not in ("auto", "cpu", "cuda"):
        raise MagsegError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MagsegError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu")
    n = torch.cuda.device_count()
    if os.environ.get("MAGSEG_GPU_PER_PROCESS") == "1" and n == 1:
        return torch.device("cuda", 0)  # the launcher masked this process to its one GPU
    if local_rank >= n:
        raise MagsegError(
            f"LOCAL_RANK={local_rank} but only {n} GPU(s) are visible; start one process per GPU"
        )
    return torch.device("cuda", local_rank)


def timeout_seconds() -> float:
    """Rendezvous and collective timeout: ``MAGSEG_DIST_TIMEOUT_S`` (default 600 s)."""
    text = os.environ.get("MAGSEG_DIST_TIMEOUT_S", "600")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise MagsegError(f"MAGSEG_DIST_TIMEOUT_S={text!r} must be a positive number of seconds")
    return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _interface_towards(addr: str) -> tuple[str, str] | None:
    """(interface name, local address) of the route to ``addr``; None if unknown."""
    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(addr), 9))  # UDP: no packet is sent
            local = s.getsockname()[0]
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name, local
    return None


def gloo_binding() -> str:
    """Where gloo will bind; sets GLOO_SOCKET_IFNAME when the host name means loopback but the
    master is on another host. Returns a description for the rank log."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return f"interface {os.environ['GLOO_SOCKET_IFNAME']} (GLOO_SOCKET_IFNAME)"
    host = socket.gethostname()
    master = os.environ.get("MASTER_ADDR", "")
    if _is_loopback(host) and master and not _is_loopback(master):
        found = _interface_towards(master)
        if found:
            os.environ["GLOO_SOCKET_IFNAME"] = found[0]
            return f"interface {found[0]} ({found[1]}, the route to {master})"
    try:
        return f"{socket.gethostbyname(host)} ({host})"
    except OSError:
        return f"{host} (unresolved)"


def init_distributed(device: str = "auto") -> DistEnv:
    """Read the world from the environment, pick the device and join the process group."""
    rank, world_size, local_rank = read_world()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistEnv(rank, 1, local_rank, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dist.is_initialized():
        # The caller (e.g. a test harness) already joined a group; use it as is.
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev,
                       dist.get_backend(), owns_group=False)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise MagsegError(
                f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun or submit"
            )
    timeout = timeout_seconds()
    binding = gloo_binding() if backend == "gloo" else "nccl"
    log.info("joining process group: rank %d of %d, backend %s, device %s, master %s:%s, "
             "bind %s, timeout %.0f s", rank, world_size, backend, dev,
             os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], binding, timeout)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout),
                            device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank, world_size, local_rank, dev, backend, owns_group=True)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(env: DistEnv, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op for one process); returns it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=env.device if env.backend == "nccl" else None)
    return box[0]


@torch.no_grad()
def broadcast_buffers(env: DistEnv, module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank.

    Without SyncBN each rank updates its running statistics from its own batch; syncing them
    after every step keeps the student, and so the EMA teacher, identical on all ranks.
    """
    if env.distributed:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)
