"""What ran a stage: library versions and the machine, including its load (the machines are shared)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

_PACKAGES = ("deploykit", "torch", "numpy", "onnx", "onnxruntime", "torch-pruning", "torchao", "scikit-learn")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# /proc/cpuinfo flag -> the name the INT8 kernels care about (their speed differs ~3x between AVX2 and VNNI).
_ISA_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}
BF16_ISA = ("AVX-512 BF16", "AMX-BF16")  # what makes BF16 arithmetic fast on a CPU (without it, it is emulated)


def bf16_unsupported(machine: dict[str, Any]) -> str | None:
    """Why a machine record's CPU has no native BF16 (no AVX-512 BF16 or AMX-BF16), or None when it has."""
    if any(isa in machine.get("isa", []) for isa in BF16_ISA):
        return None
    have = ", ".join(machine.get("isa", [])) or "none recorded"
    return f"this CPU has neither AVX-512 BF16 nor AMX-BF16 (its vector ISA: {have})"


def cpu_isa() -> list[str]:
    """The vector instruction sets of this CPU that decide INT8 and FP32 kernel speed, e.g. ['AVX2', 'AVX-512']."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [name for flag, name in _ISA_FLAGS.items() if flag in flags]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def machine_info() -> dict[str, Any]:
    """CPU, cores, torch threads, GPU and the 1/5/15-minute load averages at this moment."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return info
