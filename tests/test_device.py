"""Where and in what precision to run (captioning.device)."""
import pytest
import torch

from captioning import device


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                         (False, False, "fp32")])
def test_auto_precision_on_the_cpu_follows_the_units_pytorchs_kernels_see(monkeypatch, avx512_bf16, amx, expected):
    # CPUID as PyTorch reads it, not /proc/cpuinfo: under a CPUID mask (benchmarks/avx2_only.py) or an
    # emulator the two differ, and bf16 without the units would run emulated, slower than fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    device.cpu_has_bf16.cache_clear()
    try:
        assert device.resolve_precision("auto", torch.device("cpu")) == expected
        assert device.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    finally:
        device.cpu_has_bf16.cache_clear()
