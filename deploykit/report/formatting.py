"""How numbers read in tables: one place, so the benchmark table and the report agree."""

from __future__ import annotations

from typing import Any

NA = "n/a"


def ms(value: float | None) -> str:
    if value is None:
        return NA
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def count(value: int | None) -> str:
    """1234567 -> 1.23M: parameter and MAC counts."""
    if value is None:
        return NA
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def percent(fraction: float | None) -> str:
    return NA if fraction is None else f"{100 * fraction:.2f}%"


def megabytes(size_bytes: int | None) -> str:
    return NA if size_bytes is None else f"{size_bytes / 1e6:.2f}"


def rate(value: float | None) -> str:
    if value is None:
        return NA
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def ratio(value: float | None) -> str:
    if value is None:
        return NA
    return f"{value:.2g}x" if value < 0.1 else f"{value:.2f}x"  # 0.00x would hide a 1000x slowdown


def seconds(value: float | None) -> str:
    return NA if value is None else f"{value:.1f} s"


def load(values: list[float] | None) -> str:
    return NA if not values else " / ".join(f"{v:.2f}" for v in values)


def isa(machine: dict[str, Any]) -> str:
    """The CPU's vector instruction sets, as machine_info() recorded them."""
    return ", ".join(machine.get("isa") or []) or "instruction set not recorded"
