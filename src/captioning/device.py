"""Where and in what precision to run: one answer for training and inference."""
from __future__ import annotations

import contextlib
import functools

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is visible "
                         "(torch.cuda.is_available() is False); "
                         "--device cpu (or train.device: cpu) runs on the CPU")
    return device


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AMX, AVX-512 BF16), where bf16 is a speed-up: as
    PyTorch's kernels see the CPU (CPUID, which a CPUID mask or an emulator can change), or, in a
    PyTorch without that check, as /proc/cpuinfo lists it."""
    cpu = torch.cpu
    if hasattr(cpu, "_is_avx512_bf16_supported") and hasattr(cpu, "_is_amx_tile_supported"):
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA that has it (else fp16) and on bf16-capable CPUs, fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA (on the CPU use bf16 or fp32)")
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
