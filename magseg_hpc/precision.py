"""Numeric precision of model forwards: fp32, or bf16 autocast where the hardware has bf16.

Under bf16 autocast, convolutions and matmuls run in bfloat16 (fp32's range, an 8-bit
mantissa); softmax, losses, the optimizer and the EMA teacher stay fp32 (callers take
``.float()`` of the logits). CPUs with AVX512_BF16 or AMX and CUDA GPUs from Ampere on compute
bf16 natively: on this project's 2-core AVX512_BF16 machine the cpu_best model's forward
runs 2x faster and segment-volume's labels agree with fp32's to within 0.002 mIoU
(``benchmarks/results/precision.md``). Elsewhere bf16 is emulated and slower than fp32, so
``auto`` takes bf16 only where it is native.
"""

from __future__ import annotations

import contextlib
import functools

from magseg_hpc.errors import MagsegError

PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags of CPUs with bf16 dot products (Cooper Lake, Sapphire Rapids, Zen 4 on)
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (Linux's cpuinfo flags; False where unknown)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(BF16_CPU_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def check_precision(choice: str, key: str = "--precision") -> str:
    if choice not in PRECISIONS:
        raise MagsegError(f"{key} {choice!r}: expected one of {', '.join(PRECISIONS)}")
    return choice


def resolve_precision(choice: str, device) -> str:
    """"fp32" or "bf16" for ``choice`` on ``device`` (auto: bf16 where it is native)."""
    check_precision(choice)
    if choice != "auto":
        return choice
    import torch  # heavy: the CLI imports this module for PRECISIONS only

    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def autocast(device, precision: str):
    """The forward's context: bf16 autocast on ``device``'s kind, or nothing for fp32.
    ``precision`` is a decided one: auto here would silently mean fp32 on every device."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"autocast takes fp32 or bf16, got {precision!r}: resolve_precision "
                         "decides auto")
    if precision == "bf16":
        import torch  # heavy: see resolve_precision

        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(precision: str, device) -> str:
    """One phrase for logs: which precision and why (emulated bf16 is slower than fp32)."""
    if precision == "bf16" and str(device).startswith("cpu") and not cpu_has_bf16():
        return "bf16 (emulated: this CPU has no native bf16, slower than fp32)"
    return precision
