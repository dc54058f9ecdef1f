"""Which precision training computes in: `precision: auto` (the default) decides from the machine.

BF16 autocast on CPUs that have AVX-512 BF16 or AMX-BF16 (ResNet-18 trained 1.5x faster in it on an AMX Xeon, in
the same accuracy range: BENCHMARKS.md) and on GPUs that support it; FP32 elsewhere, where BF16 would be emulated
and slower. The weights stay FP32 either way (autocast), so what is exported does not change.
"""

from __future__ import annotations

from typing import Any

import torch

from deploykit.machine import bf16_unsupported, machine_info


def training_precision(asked: str, device_type: str, record: dict[str, Any] | None = None) -> tuple[str, str]:
    """(precision, why) for `asked` (auto, fp32, bf16 or fp16) on `device_type` (cpu or cuda); `record` is the
    machine record to decide from (default: this machine's)."""
    if asked != "auto":
        return asked, "set in the pipeline"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU computes in BF16"
        return "fp32", "auto: this GPU has no BF16"
    why_not = bf16_unsupported(record if record is not None else machine_info())
    if why_not:
        return "fp32", f"auto: {why_not}"
    return "bf16", "auto: this CPU has AVX-512 BF16 or AMX-BF16"
